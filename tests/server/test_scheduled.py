"""Load LoRA (timestep schedule) in a real ComfyUI over HTTP: the committed example workflow (a style LoRA faded in
over the last half beside the same LoRA at constant strength, stock LoraLoaderModelOnly) on the tiny SDXL, with a
per-call trace of each call's strength."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import STYLE_LORA_SDXL
from tests.server.test_sampling import SDXL_COND, SIZE, WF, discrete_sigmas, pixels, trace_len, trace_lines
from tools.harness import workflow
from tools.harness.server import error_message

EXAMPLE = WF / "tlora_scheduled_lora_fade_in.json"


def _prompt(server, tiny, overrides=None):
    from pathlib import Path

    files = {"unet": Path(tiny["sdxl"]["comfy_file"]).name, "vae": Path(tiny["vae"]["vae_4ch"]).name,
             "lora": STYLE_LORA_SDXL}
    info = server.get("/object_info")
    return workflow.substitute_tiny(workflow.to_api(workflow.load(EXAMPLE), info), files, SDXL_COND,
                                    {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, **(overrides or {})})


def percent_of(sigma: float) -> float:
    """ComfyUI's percent of a discrete model's sigma, computed here without ComfyUI: percent_to_sigma(p) is the
    sigma of timestep (1 - p) * 999, log-interpolated in the DDPM table; this inverts it."""
    log_sigmas = np.log(discrete_sigmas())
    t = float(np.interp(np.log(sigma), log_sigmas, np.arange(1000)))
    return 1.0 - t / 999.0


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "simple"])
def test_every_call_gets_the_strength_of_its_sigma(server, tiny, sampler, scheduler):
    steps = 6
    prompt = _prompt(server, tiny, {"KSampler": {"steps": steps, "sampler_name": sampler, "scheduler": scheduler}})
    start = trace_len(server)
    entry = server.run(prompt)
    assert len(server.images(entry)) == 2
    calls = [c for c in trace_lines(server, start) if c["lora"] == STYLE_LORA_SDXL]
    per_step = 2 if sampler == "heun" else 1
    assert len(calls) == per_step * steps - (per_step - 1), [c["sigma"] for c in calls]
    got = []
    for c in calls:
        for sigma, strength in zip(c["sigma"], c["strength"], strict=True):
            p = percent_of(sigma)
            want = 0.0 if p < 0.5 else (p - 0.5) / 0.5  # linear 0 -> 1 over the last half
            assert strength == pytest.approx(want, abs=2e-3), (sampler, scheduler, sigma, p, strength)
            got.append(strength)
    assert got[0] == 0.0 and max(got) > 0.5 and got == sorted(got), got


def test_fading_in_differs_from_constant_strength(server, tiny, artifacts):
    entry = server.run(_prompt(server, tiny, {"KSampler": {"steps": 6}}))
    imgs = {}
    for node_out in entry["outputs"].values():
        for img in node_out.get("images", []):
            imgs[img["filename"].split("_0")[0]] = server.get(f"/view?filename={img['filename']}&type=output")
    assert set(imgs) == {"scheduled_lora_fade_in", "scheduled_lora_constant"}, list(imgs)
    for name, png in imgs.items():
        (artifacts / f"{name}.png").write_bytes(png)
    assert np.abs(pixels(imgs["scheduled_lora_fade_in"]) - pixels(imgs["scheduled_lora_constant"])).mean() > 0.5


@pytest.mark.parametrize("inputs, says", [
    ({"start_percent": 0.8, "end_percent": 0.2}, "is before start_percent"),
    ({"keyframes": "0:0, half:1"}, "not percent:strength"),
    ({"keyframes": "0:0, 1.5:1"}, "outside 0..1"),
    ({"lora_name": "tlora_sdxl/pytorch_lora_weights.safetensors"}, "load it with Load T-LoRA"),
    ({"lora_name": "not_a_lora.safetensors"}, "a VAE, not a LoRA"),
])
def test_bad_schedules_and_files_give_a_clear_error_and_the_server_keeps_serving(server, tiny, inputs, says):
    prompt = _prompt(server, tiny, {"KSampler": {"steps": 2}})
    node = next(k for k, v in prompt.items() if v["class_type"] == "TLoRAScheduledLoRA")
    prompt[node]["inputs"].update(inputs)
    msg = error_message(server.run(prompt, expect_error=True))
    assert says in msg and prompt[node]["inputs"]["lora_name"].split("/")[-1] in msg, msg
    assert len(server.images(server.run(_prompt(server, tiny, {"KSampler": {"steps": 2}})))) == 2


def _hooks_vs_node_prompt(tiny, schedule: str) -> dict:
    """One KSampler run on the tiny SDXL: the style LoRA by ComfyUI's hook keyframes (strength 0 from 0 %, 1 from
    50 %), by this node (constant 1 from 50 %), or not at all."""
    from pathlib import Path

    p = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": Path(tiny["sdxl"]["comfy_file"]).name,
                                                      "weight_dtype": "default"}},
         "2": {"class_type": "VAELoader", "inputs": {"vae_name": Path(tiny["vae"]["vae_4ch"]).name}},
         "3": {"class_type": "TLoRADevConditioning", "inputs": {"seed": 11, **SDXL_COND}},
         "4": {"class_type": "TLoRADevConditioning", "inputs": {"seed": 12, **SDXL_COND}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
         "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                    "latent_image": ["5", 0], "seed": 3, "control_after_generate":
                                                    "fixed", "steps": 6, "cfg": 4.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0}},
         "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 0]}},
         "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"hooks_{schedule}"}}}
    del p["6"]["inputs"]["control_after_generate"]
    if schedule == "hooks":
        p |= {"10": {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": STYLE_LORA_SDXL,
                                                                         "strength_model": 8.0}},
              "11": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.0, "start_percent": 0.0}},
              "12": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 1.0, "start_percent": 0.5,
                                                                    "prev_hook_kf": ["11", 0]}},
              "13": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["10", 0], "hook_kf": ["12", 0]}},
              "14": {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": ["3", 0], "strength": 1.0,
                                                                            "set_cond_area": "default",
                                                                            "hooks": ["13", 0]}},
              "15": {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": ["4", 0], "strength": 1.0,
                                                                            "set_cond_area": "default",
                                                                            "hooks": ["13", 0]}}}
        p["6"]["inputs"] |= {"positive": ["14", 0], "negative": ["15", 0]}
    elif schedule == "node":
        p["20"] = {"class_type": "TLoRAScheduledLoRA", "inputs": {
            "model": ["1", 0], "lora_name": STYLE_LORA_SDXL, "strength_model": 8.0, "strength_clip": 0.0,
            "start_percent": 0.5, "end_percent": 1.0, "strength_start": 1.0, "strength_end": 1.0,
            "curve": "constant", "keyframes": ""}}
        p["6"]["inputs"]["model"] = ["20", 0]
    return p


def test_the_same_schedule_by_comfys_hook_keyframes_gives_the_same_image(server, tiny, artifacts):
    """ComfyUI's own route for a scheduled LoRA (hook keyframes, weights re-patched at each keyframe) and this
    node's per-call route agree: the two images match to a pixel level, and both differ from the base model's."""
    imgs = {}
    for schedule in ("hooks", "node", "none"):
        imgs[schedule] = server.images(server.run(_hooks_vs_node_prompt(tiny, schedule)))[0]
        (artifacts / f"hooks_vs_node_{schedule}.png").write_bytes(imgs[schedule])
    hooks, node, none = (pixels(imgs[k]) for k in ("hooks", "node", "none"))
    assert np.abs(node - none).mean() > 0.5, "the LoRA has no visible effect"
    assert np.abs(node - hooks).max() <= 2.0 and np.abs(node - hooks).mean() < 0.1, \
        (np.abs(node - hooks).max(), np.abs(node - hooks).mean())


def test_the_preview_shows_each_calls_strength_and_the_node_its_models_sigmas(server, tiny):
    """The schedule preview, given the scheduled model, shows the strength every call of a sampler gets (heun,
    karras: two calls per step); the node sends the sigmas of its model's sampling for its curve's axis."""
    import json
    from pathlib import Path

    p = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": Path(tiny["sdxl"]["comfy_file"]).name,
                                                      "weight_dtype": "default"}},
         "2": {"class_type": "TLoRAScheduledLoRA", "inputs": {
             "model": ["1", 0], "lora_name": STYLE_LORA_SDXL, "strength_model": 0.8, "strength_clip": 0.0,
             "start_percent": 0.5, "end_percent": 1.0, "strength_start": 0.0, "strength_end": 1.0,
             "curve": "linear", "keyframes": ""}},
         "3": {"class_type": "TLoRASchedulePreview", "inputs": {
             "max_rank": 4, "min_rank": 1, "alpha": 1.0, "model": ["2", 0], "sampler_name": "heun",
             "scheduler": "karras", "steps": 6, "denoise": 1.0, "timestep_mode": "auto", "curve": "power"}}}
    out = server.run(p)["outputs"]
    sig = discrete_sigmas()
    ticks = out["2"]["tlora_sigma_ticks"]
    assert [t[0] for t in ticks] == [0.0, 0.25, 0.5, 0.75, 1.0], ticks
    assert ticks[0][1] == pytest.approx(sig[-1], rel=1e-5) and ticks[-1][1] == pytest.approx(sig[0], rel=1e-5)
    for pct, sigma in ticks[1:-1]:
        assert percent_of(sigma) == pytest.approx(pct, abs=1e-3), ticks
    assert len(out["3"]["images"]) == 1
    table = json.loads(out["3"]["text"][0])
    [lora] = table["scheduled_loras"]
    assert lora["name"] == Path(STYLE_LORA_SDXL).name and lora["strength_model"] == 0.8
    calls = lora["calls"]
    assert len(calls) == 2 * 6 - 1 and [c["sigma"] for c in calls] == [r["sigma"] for r in table["calls"]]
    for c in calls:
        pct = percent_of(c["sigma"])
        want = 0.0 if pct < 0.5 else 0.8 * (pct - 0.5) / 0.5
        assert c["strength"] == pytest.approx(want, abs=2e-3), (c, pct)
        assert c["percent"] == pytest.approx(pct, abs=1e-3), c
    assert sum(c["strength"] > 0 for c in calls) >= 3 and sum(c["strength"] == 0 for c in calls) >= 3


SHIFT, WINDOW = 8.0, (0.3, 0.7)


def shift_sigma(percent: float, shift: float = SHIFT) -> float:
    """ModelSamplingSD3's sigma at a percent, computed here without ComfyUI (t = 1 - percent, shifted)."""
    t = 1.0 - percent
    return shift * t / (1 + (shift - 1) * t)


def _f32(x: float) -> float:
    return float(np.float32(x))


def _flux_window_prompt(tiny, route: str) -> dict:
    """Tiny Flux -> the style LoRA on a window [30 %, 70 %) at strength 8 (this node; ComfyUI's hook keyframes 0 / 1 /
    0 from 0 / 30 / 70 %; or none) -> ModelSamplingSD3 shift 8 -> KSampler (euler, normal, 6 steps) -> SaveLatent;
    with this node, the schedule preview of the model that samples beside it."""
    from tests.conftest import STYLE_LORA_FLUX
    from tests.reliability import helpers

    chain = [("ModelSamplingSD3", {"shift": SHIFT})]
    if route == "node":
        chain.insert(0, helpers.scheduled_lora(STYLE_LORA_FLUX, strength_model=8.0, start_percent=WINDOW[0],
                                               end_percent=WINDOW[1]))
    p = helpers.graph(tiny, "flux", chains=(chain,), steps=6, cfg=2.0)
    if route == "hooks":
        p = helpers.with_hook_keyframes(p, STYLE_LORA_FLUX, 8.0, [(0.0, 0.0), (WINDOW[0], 1.0), (WINDOW[1], 0.0)])
    if route == "node":
        p["preview"] = {"class_type": "TLoRASchedulePreview", "inputs": {
            "max_rank": 4, "min_rank": 1, "alpha": 1.0, "model": ["b0m1", 0], "sampler_name": "euler",
            "scheduler": "normal", "steps": 6, "denoise": 1.0, "timestep_mode": "auto", "curve": "power"}}
    return p


def test_a_model_sampling_node_after_it_is_the_sampling_every_call_the_preview_and_the_labels_follow(server, tiny,
                                                                                                      artifacts):
    """Load Diffusion Model -> this node -> ModelSamplingSD3 shift 8 -> KSampler on tiny Flux, the usual SD3 / Wan /
    Flux graph: every call gets the window's strength at its sigma under shift 8 (computed here without ComfyUI);
    the sampled latent equals ComfyUI's hook keyframes' on the same model (and differs from the model without the
    LoRA); the preview given the model that samples shows each call's strength; and the node sends its curve the
    sigmas of shift 8 during the run, after its own first guess."""
    import json

    import websocket

    from tests.reliability import helpers

    prompt = _flux_window_prompt(tiny, "node")
    start = trace_len(server)
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=120)
    try:
        prompt_id = server.queue(prompt)
        events = []
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                continue
            m = json.loads(msg)
            data = m.get("data", {})
            assert m["type"] != "execution_error", data
            if m["type"] == "tlora.sigma_ticks" or m["type"] == "executed" and data.get("node") == "b0m0":
                events.append((m["type"], data))
            if m["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    finally:
        ws.close()
    entry = server.wait(prompt_id)
    calls = trace_lines(server, start)
    assert len(calls) == 6 and all(len(c["sigma"]) == 2 for c in calls), calls
    lo, hi = _f32(shift_sigma(WINDOW[1])), _f32(shift_sigma(WINDOW[0]))
    strengths = []
    for c in calls:
        for sigma, s in zip(c["sigma"], c["strength"], strict=True):
            assert s == (1.0 if lo < sigma <= hi else 0.0), (sigma, s, lo, hi)
        strengths.append(c["strength"][0])
    assert strengths.count(1.0) >= 2 and strengths.count(0.0) >= 2, strengths
    # the schedule preview, given the model that samples: each call's strength, shift 8's sigmas on its axis
    table = json.loads(entry["outputs"]["preview"]["text"][0])
    [lora] = table["scheduled_loras"]
    assert [c["sigma"] for c in lora["calls"]] == pytest.approx([c["sigma"][0] for c in calls], rel=1e-6)
    assert [c["strength"] for c in lora["calls"]] == [8.0 * s for s in strengths]
    # the node's labels: its first guess (the sampling it saw) when it ran, then the sampling of the run
    kinds = [k for k, _ in events]
    assert kinds == ["executed", "tlora.sigma_ticks"], kinds
    sent = events[1][1]
    assert sent["node"] == "b0m0", sent
    want = [[0.0, 1.0]] + [[p, shift_sigma(p)] for p in (0.25, 0.5, 0.75)] + [[1.0, shift_sigma(0.999)]]
    np.testing.assert_allclose(sent["ticks"], want, rtol=1e-6)
    np.testing.assert_allclose(lora["sigma_ticks"], want, rtol=1e-6)
    guess = events[0][1]["output"]["tlora_sigma_ticks"]
    assert guess[2][1] != pytest.approx(want[2][1], rel=1e-3), "the first guess already had shift 8"
    # the same window by ComfyUI's hook keyframes on the same model: the same latent
    got = helpers.latents(server, entry)[0]
    hooks = helpers.sample(server, _flux_window_prompt(tiny, "hooks"))
    none = helpers.sample(server, _flux_window_prompt(tiny, "none"))
    off, gap = float((got - hooks).norm() / hooks.norm()), float((none - hooks).norm() / hooks.norm())
    (artifacts / "scheduled_shift8_vs_hooks.json").write_text(json.dumps({"latent_vs_hooks": off, "latent_vs_none": gap,
                                                                         "strengths": strengths}))
    assert gap > 1e-2 and off < gap / 100, (off, gap)
