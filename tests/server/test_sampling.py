"""Real ComfyUI server over HTTP: the committed example workflows, on tiny models, with per-call traces."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MIN_RANK, RANK, ROOT, SD_SCRIPTS_SDXL, TLORA_ALPHA
from tlora_core import schedule
from tools.harness import workflow
from tools.harness.server import error_message

WF = ROOT / "example_workflows"
SDXL_COND = {"tokens": 8, "context_dim": 2048, "pooled_dim": 1280}
SDXL_LORA = "tlora_sdxl/pytorch_lora_weights.safetensors"
SIZE = 64


def sdxl_files(tiny):
    return {"unet": Path(tiny["sdxl"]["comfy_file"]).name, "vae": Path(tiny["vae"]["vae_4ch"]).name, "lora": SDXL_LORA}


def discrete_sigmas() -> np.ndarray:
    """The SD/SDXL training sigmas (scaled-linear betas 0.00085..0.012), computed without ComfyUI."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    return np.sqrt((1 - acp) / acp)


def assert_discrete_schedule(calls: list[dict]) -> None:
    """Each call's t is the nearest discrete timestep of its sigma (in log space, as ComfyUI does) and its
    rank is the sidecar schedule's rank at t."""
    table = discrete_sigmas()
    for c in calls:
        assert (c["max_rank"], c["min_rank"], c["alpha"]) == (RANK, MIN_RANK, TLORA_ALPHA)
        for sigma, t, rank in zip(c["sigma"], c["t"], c["rank"], strict=True):
            assert t == int(np.abs(np.log(table) - np.log(sigma)).argmin())
            assert rank == schedule.active_rank(t, RANK, MIN_RANK, TLORA_ALPHA)


def trace_lines(server, start: int) -> list[dict]:
    lines = server.trace_path.read_text().splitlines() if server.trace_path.exists() else []
    return [json.loads(x) for x in lines[start:]]


def trace_len(server) -> int:
    return len(server.trace_path.read_text().splitlines()) if server.trace_path.exists() else 0


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_nodes_have_descriptions_and_tooltips(server):
    info = server.get("/object_info")
    ours = sorted(k for k, v in info.items() if "ComfyUI-TLoRA" in v.get("python_module", "") and "dev" not in
                  v.get("python_module", "").split("ComfyUI-TLoRA")[-1].lower())
    assert ours == ["TLoRALoader", "TLoRASaveWithBase", "TLoRASchedulePreview", "TLoRAScheduledLoRA",
                    "TLoRATrain"], ours
    for node_id in ours:
        node = info[node_id]
        assert node["description"], node_id
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(node["output_tooltips"]), f"{node_id} outputs lack tooltips"
    assert info["TLoRALoader"]["display_name"] == "Load T-LoRA"


def test_info_route_reports_rank_and_sidecar_schedule(server):
    body = server.get(f"/tlora/info?lora_name={SDXL_LORA}")
    assert body["format"] == "lycoris_tlora" and body["rank"] == RANK
    assert body["recorded"]["min_rank"]["value"] == MIN_RANK
    assert "sidecar" in body["recorded"]["min_rank"]["source"]
    assert body["recorded"]["alpha"]["value"] == pytest.approx(TLORA_ALPHA)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "simple"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_every_call_uses_the_rank_of_its_sigma(server, tiny, sampler, scheduler, cfg):
    steps = 5
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(
        workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info), sdxl_files(tiny), SDXL_COND,
        {"EmptyLatentImage": {"width": SIZE, "height": SIZE},
         "KSampler": {"steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler}})
    start = trace_len(server)
    entry = server.run(prompt)
    assert len(server.images(entry)) == 1
    calls = trace_lines(server, start)
    per_step = 2 if sampler == "heun" else 1
    assert len(calls) == per_step * steps - (per_step - 1), [c["sigma"] for c in calls]
    assert_discrete_schedule(calls)
    ranks = [c["rank"][0] for c in calls]
    assert ranks[0] == MIN_RANK and max(ranks) > MIN_RANK, ranks


def test_a_writers_file_runs_with_its_trainers_schedule_through_the_node(server, tiny):
    """An sd-scripts + 67372a LyCORIS file (stored base, 3x3 convs, no min_rank recorded) in the example workflow:
    the node names its writer, and every call's rank is that trainer's rule with its default min_rank ceil(R/2)."""
    import math

    from tools.writer_files import rank_lycoris

    body = server.get(f"/tlora/info?lora_name={SD_SCRIPTS_SDXL}")
    assert body["writer"]["id"] == "sd_scripts_67372a" and body["curve"] == "power"
    assert body["recorded"]["min_rank"] == {"value": math.ceil(RANK / 2),
                                            "source": "the trainer's default ceil(rank / 2)"}
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(
        workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info), {**sdxl_files(tiny),
                                                                               "lora": SD_SCRIPTS_SDXL},
        SDXL_COND, {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 6}})
    start = trace_len(server)
    assert len(server.images(server.run(prompt))) == 1
    calls = trace_lines(server, start)
    table = discrete_sigmas()
    assert len(calls) == 6
    for c in calls:
        assert (c["max_rank"], c["min_rank"], c["alpha"], c["curve"]) == (RANK, math.ceil(RANK / 2), 1.0, "power")
        for sigma, t, rank in zip(c["sigma"], c["t"], c["rank"], strict=True):
            assert t == int(np.abs(np.log(table) - np.log(sigma)).argmin())
            assert rank == rank_lycoris(t, RANK, math.ceil(RANK / 2), 1.0)


def test_schedule_differs_from_all_ranks(server, tiny, artifacts):
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(
        workflow.to_api(workflow.load(WF / "tlora_compare_schedule_vs_all_ranks.json"), info), sdxl_files(tiny),
        SDXL_COND, {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 4}})
    entry = server.run(prompt)
    imgs = {}
    for node_out in entry["outputs"].values():
        for img in node_out["images"]:
            imgs[img["filename"].split("_0")[0]] = server.get(f"/view?filename={img['filename']}&type=output")
    assert set(imgs) == {"tlora_schedule", "tlora_merged"}, list(imgs)
    for name, png in imgs.items():
        (artifacts / f"compare_{name}.png").write_bytes(png)
    diff = np.abs(pixels(imgs["tlora_schedule"]) - pixels(imgs["tlora_merged"])).mean()
    assert diff > 0.5, diff


@pytest.mark.parametrize(("sampler", "steps", "calls"), [("heun", 6, 11), ("euler", 5, 5), ("dpmpp_2m", 4, 4)])
def test_schedule_preview_reports_each_sampler_call(server, tiny, artifacts, sampler, steps, calls):
    """The preview node's own output (no PreviewImage needed): its plot, and its table of every model call the
    sampler makes (Heun: two per step but the last), each with the rank of its own sigma, found by running the
    sampler (never the one-call-per-step fallback for these samplers)."""
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(workflow.to_api(workflow.load(WF / "tlora_schedule_preview.json"), info),
                                      sdxl_files(tiny), SDXL_COND,
                                      {"TLoRASchedulePreview": {"steps": steps, "sampler_name": sampler,
                                                                "max_rank": RANK, "min_rank": MIN_RANK,
                                                                "alpha": TLORA_ALPHA}})
    entry = server.run(prompt)
    node = next(k for k, v in prompt.items() if v["class_type"] == "TLoRASchedulePreview")
    own = entry["outputs"][node]
    assert len(own["images"]) == 1 and not [k for k, v in prompt.items() if v["class_type"] == "PreviewImage"]
    png = server.get(f"/view?filename={own['images'][0]['filename']}&type=temp")
    (artifacts / f"schedule_preview_{sampler}.png").write_bytes(png)
    assert pixels(png).shape[2] == 3 and pixels(png).std() > 1
    table = json.loads(own["text"][0])
    assert table["simulated"] is True and table["sampler"] == sampler and len(table["calls"]) == calls
    assert table["schedule"] == [[t, schedule.active_rank(t, RANK, MIN_RANK, TLORA_ALPHA)] for t in (0, 250, 500, 750,
                                                                                                      999)]
    assert_discrete_schedule([{"sigma": [c["sigma"]], "t": [c["t"]], "rank": [c["rank"]], "max_rank": RANK,
                               "min_rank": MIN_RANK, "alpha": TLORA_ALPHA} for c in table["calls"]])
    sigmas = [c["sigma"] for c in table["calls"]]
    assert sigmas[0] == max(sigmas) and table["calls"][0]["rank"] == MIN_RANK


def test_base_model_output_is_unchanged_after_a_tlora_run(server, tiny):
    """The same workflow without the T-LoRA gives bit-identical images before and after a T-LoRA run."""
    info = server.get("/object_info")
    api = workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info)
    overrides = {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 3}}
    with_tlora = workflow.substitute_tiny(api, sdxl_files(tiny), SDXL_COND, overrides)
    without = json.loads(json.dumps(with_tlora))
    loader = next(k for k, v in without.items() if v["class_type"] == "TLoRALoader")
    src = without[loader]["inputs"]["model"]
    del without[loader]
    for node in without.values():
        for k, v in node["inputs"].items():
            if v == [loader, 0]:
                node["inputs"][k] = src
    before = server.images(server.run(without))[0]
    server.run(with_tlora)
    after = server.images(server.run(without))[0]
    assert pixels(before).tobytes() == pixels(after).tobytes()
    with_img = server.images(server.run(with_tlora))[0]
    assert pixels(with_img).tobytes() != pixels(after).tobytes()


def test_bad_file_gives_a_clear_error_and_server_keeps_serving(server, tiny, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    link = Path(server.base) / "models" / "loras" / "broken.safetensors"
    link.symlink_to(bad)
    info = server.get("/object_info")
    overrides = {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 2}}
    api = workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info)
    try:
        broken = workflow.substitute_tiny(api, {**sdxl_files(tiny), "lora": "broken.safetensors"}, SDXL_COND, overrides)
        entry = server.run(broken, expect_error=True)
    finally:
        link.unlink()
    msg = error_message(entry)
    assert "broken.safetensors" in msg and "safetensors" in msg, msg
    # still serving, and the good file still works
    ok = workflow.substitute_tiny(api, sdxl_files(tiny), SDXL_COND, overrides)
    assert len(server.images(server.run(ok))) == 1


def test_flux_example_workflow_with_an_official_flux_file(server, tiny, artifacts):
    """Flux: flow-model timesteps (sigma * 1000; a float for the official repo's Flux pipeline)."""
    info = server.get("/object_info")
    files = {"unet": Path(tiny["flux"]["comfy_file"]).name, "vae": Path(tiny["vae"]["vae_16ch"]).name,
             "lora": "tlora_flux/lora.pt"}
    prompt = workflow.substitute_tiny(workflow.to_api(workflow.load(WF / "tlora_flux_txt2img.json"), info), files,
                                      {"tokens": 8, "context_dim": 4096, "pooled_dim": 768},
                                      {"EmptySD3LatentImage": {"width": SIZE, "height": SIZE},
                                       "KSampler": {"steps": 4}})
    start = trace_len(server)
    entry = server.run(prompt)
    png = server.images(entry)[0]
    (artifacts / "flux_tlora.png").write_bytes(png)
    calls = trace_lines(server, start)
    assert len(calls) == 4
    for c in calls:
        assert (c["max_rank"], c["min_rank"], c["alpha"]) == (RANK, 1, 1.0)  # nothing recorded: defaults
        for sigma, t, rank in zip(c["sigma"], c["t"], c["rank"], strict=True):
            assert t == pytest.approx(sigma * 1000, rel=1e-6)
            assert rank == schedule.active_rank(t, RANK, 1, 1.0)
    assert calls[0]["rank"][0] < calls[-1]["rank"][0]  # shifted flow sigmas stay high over 4 steps


def test_batch_of_two_and_img2img_start_part_way(server, tiny):
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(
        workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info), sdxl_files(tiny), SDXL_COND,
        {"EmptyLatentImage": {"width": SIZE, "height": SIZE, "batch_size": 2},
         "KSampler": {"steps": 4, "cfg": 4.0, "denoise": 0.5}})
    start = trace_len(server)
    entry = server.run(prompt)
    assert len(server.images(entry)) == 2
    calls = trace_lines(server, start)
    assert len(calls) == 4
    assert all(len(c["sigma"]) == 4 for c in calls)  # cond + uncond for each of the two images
    assert_discrete_schedule(calls)
    assert calls[0]["t"][0] < 900  # denoise 0.5 starts half-way down the schedule


@pytest.mark.parametrize("order", ["tlora_first", "patches_first"])
def test_tlora_with_other_model_patches_and_wrappers(server, tiny, order):
    """Works beside other model patches (FreeU_V2), sampling overrides (ModelSamplingDiscrete) and wrappers."""
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(
        workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info), sdxl_files(tiny), SDXL_COND,
        {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 4, "cfg": 3.0}})
    loader = next(k for k, v in prompt.items() if v["class_type"] == "TLoRALoader")
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    base = prompt[loader]["inputs"]["model"]
    prompt["90"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": None, "sampling": "v_prediction",
                                                                      "zsnr": False}}
    prompt["91"] = {"class_type": "FreeU_V2", "inputs": {"model": ["90", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9,
                                                         "s2": 0.2}}
    if order == "tlora_first":
        prompt["90"]["inputs"]["model"] = [loader, 0]
        prompt[sampler]["inputs"]["model"] = ["91", 0]
    else:
        prompt["90"]["inputs"]["model"] = base
        prompt[loader]["inputs"]["model"] = ["91", 0]
    start = trace_len(server)
    entry = server.run(prompt)
    assert len(server.images(entry)) == 1
    calls = trace_lines(server, start)
    assert len(calls) == 4
    assert_discrete_schedule(calls)


def test_info_route_reads_only_the_header_of_big_files(server, tmp_path):
    """The node asks about a file whenever one is picked: the answer comes from the file's header (shapes and
    metadata), so a 330 MB T-LoRA is described at once and the server keeps none of it in memory."""
    import time

    import psutil
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    for m in range(160):  # ~330 MB of factors: reading them all would take seconds and hold their size
        p = f"lycoris_down_blocks_0_attentions_0_transformer_blocks_{m}_ff_net_0_proj"
        sd[f"{p}.q_layer.weight"] = torch.randn(64, 5120, generator=g)
        sd[f"{p}.p_layer.weight"] = torch.randn(5120, 64, generator=g)
        sd[f"{p}.lambda_layer"] = torch.ones(1, 64)
        sd[f"{p}.alpha"] = torch.tensor(32.0)
    big = tmp_path / "big_tlora.safetensors"
    save_file(sd, str(big))
    del sd
    link = Path(server.base) / "models" / "loras" / "big_tlora.safetensors"
    link.symlink_to(big)
    proc = psutil.Process(server.proc.pid)
    try:
        server.get("/tlora/info?lora_name=big_tlora.safetensors")  # warm: first-use imports and allocations
        before = proc.memory_info().rss
        t0 = time.perf_counter()
        for _ in range(3):
            body = server.get("/tlora/info?lora_name=big_tlora.safetensors", timeout=120)
        seconds = (time.perf_counter() - t0) / 3
        grown = proc.memory_info().rss - before
    finally:
        link.unlink()
    assert body["modules"] == 160 and body["rank"] == 64 and body["format"] == "lycoris_tlora"
    assert seconds < 0.25, f"/tlora/info took {seconds:.2f} s for a 330 MB file: it read more than the header"
    assert grown < 64 << 20, f"the server grew by {grown >> 20} MB describing a 330 MB file"


def test_first_load_counts_its_layers_on_comfys_progress_bar(server, tiny):
    """While the loader builds the SVD base it reports each layer on ComfyUI's progress bar: `progress` websocket
    messages of the loader node that end at value == max == the file's module count."""
    import websocket

    # a copy under a new path: the in-process memo of earlier loads (keyed on the file's path) does not apply
    loras = Path(server.base) / "models" / "loras"
    shutil.copytree(loras / Path(SDXL_LORA).parent, loras / "tlora_sdxl_progress")
    name = f"tlora_sdxl_progress/{Path(SDXL_LORA).name}"
    info = server.get("/object_info")
    api = workflow.to_api(workflow.load(WF / "tlora_sdxl_txt2img.json"), info)
    overrides = {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 2}}
    prompt = workflow.substitute_tiny(api, {**sdxl_files(tiny), "lora": name}, SDXL_COND, overrides)
    loader = next(k for k, v in prompt.items() if v["class_type"] == "TLoRALoader")
    modules = server.get(f"/tlora/info?lora_name={name}")["modules"]
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=60)
    try:
        prompt_id = server.queue(prompt)
        progress = []
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            m = json.loads(msg)
            data = m.get("data", {})
            if m["type"] == "progress" and data.get("node") == loader:
                progress.append((data["value"], data["max"]))
            if m["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
            assert m["type"] != "execution_error", data
    finally:
        ws.close()
        shutil.rmtree(loras / "tlora_sdxl_progress")
    assert progress, "the loader sent no progress"
    assert progress[-1] == (modules, modules), progress[-5:]
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)


def test_schedule_preview_draws_a_trainers_own_curve(server, tiny):
    """With `curve` (lora-scripts-next's cosine here) the table and every sampler call follow that curve."""
    info = server.get("/object_info")
    prompt = workflow.substitute_tiny(workflow.to_api(workflow.load(WF / "tlora_schedule_preview.json"), info),
                                      sdxl_files(tiny), SDXL_COND,
                                      {"TLoRASchedulePreview": {"steps": 5, "max_rank": RANK, "min_rank": MIN_RANK,
                                                                "alpha": 1.0, "curve": "cosine"}})
    node = next(k for k, v in prompt.items() if v["class_type"] == "TLoRASchedulePreview")
    table = json.loads(server.run(prompt)["outputs"][node]["text"][0])
    assert table["curve"] == "cosine"
    assert table["schedule"] == [[t, schedule.active_rank(t, RANK, MIN_RANK, 1.0, curve="cosine")]
                                 for t in (0, 250, 500, 750, 999)]
    assert table["schedule"] != [[t, schedule.active_rank(t, RANK, MIN_RANK, 1.0)] for t in (0, 250, 500, 750, 999)]
    for c in table["calls"]:
        assert c["rank"] == schedule.active_rank(c["t"], RANK, MIN_RANK, 1.0, curve="cosine")
