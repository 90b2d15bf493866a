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
