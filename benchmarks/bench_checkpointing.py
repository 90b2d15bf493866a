"""What gradient checkpointing saves in Train T-LoRA, per model family: the bytes autograd keeps for one training step
with it off and on, on the families' tiny twins (tools/families) at latents where activations dominate, and on three
deeper layouts (SDXL's transformer depths; SD3.5 and Flux with more blocks). Prints one JSON on stdout and the
markdown table on stderr.

  python benchmarks/bench_checkpointing.py                         every listed model (CPU, ~15 minutes on 2 cores)
  python benchmarks/bench_checkpointing.py --models sdxl,flux      some of them
  python benchmarks/bench_checkpointing.py --smoke                 small latents, three models (a few minutes)
  python benchmarks/bench_checkpointing.py --full-size             SD1.5 at 512², SDXL and Flux.1 dev at 1024², bf16,
                                                                   rank 64, counted on the meta device (a minute)

Bytes: unique storages autograd saves for the backward pass (`tools/train_memory.py`), the model's weights and the
trainable factors left out (held anyway). "kept" is what the forward leaves for the backward pass; "peak" the most
held at once through the backward pass, where checkpointing recomputes one unit at a time. Step seconds include the
counting hooks (Python per saved tensor): read them as a rough cost of the recomputation, not as training speed.
`--full-size`: see `checkpointing_full_size.py`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import tiny_models as tm  # noqa: E402
from tools import train_memory as tmem  # noqa: E402
from tools.harness.inproc import import_pack  # noqa: E402
from tools.harness.server import host_version  # noqa: E402

RANK, MIN_RANK, TARGETS = 16, 1, "attention"
# family -> latent side (the twin's own latent shape otherwise: channels, frames); UNets at 64x64, image DiTs at
# 1024 tokens (2x2 patches; the SD3 twin's position table stops at 16x16), video at 3 latent frames of 32x32
FAMILY_SIDES = {"sd15": 64, "sdxl": 64, "sd3": 16, "flux": 64, "flux2": 32, "auraflow": 64, "pixart_sigma": 64,
                "zimage": 64, "hidream": 64, "qwen_image": 64, "chroma": 64, "hunyuan_image21": 32, "wan21": 32,
                "hunyuan_video": 32, "ltxv": 32}
DEEP = ("sdxl_depths", "sd3_deep", "flux_deep")
SMOKE = {"sd15": 16, "flux": 16, "sdxl_depths": 16}


def _family(pack, name: str, side: int):
    from tools.families import FAMILIES
    from tools.families.base import sigma_for

    fam = FAMILIES[name]
    twin = fam.build(0)
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(1))
    x = torch.randn(*x.shape[:-2], side, side, generator=torch.Generator().manual_seed(2))
    return fam.title, twin.patcher, x, conds, sigma_for(twin.patcher, 500, fam.flow)


def _sdxl_depths(pack, side: int):
    """SDXL's layout and transformer depths (2 and 10 per block, 10 in the middle) at 1/5 of its width."""
    import comfy

    from benchmarks.bench_train import _model

    spec = tm.UNetSpec((64, 128, 256), 2, (0, 2, 10), (0, 2, 10), 10, 256, head_channels=32, linear_proj=True,
                       pooled_dim=64)
    patcher = _model(comfy, spec, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    conds = {"c_crossattn": torch.randn(1, 77, 256, generator=g), "y": torch.randn(1, 64 + 6 * 256, generator=g)}
    sigma = patcher.model.model_sampling.sigma(torch.tensor([500.0])).reshape(1)
    return "SDXL depths (2 / 10), 1/5 width", patcher, torch.randn(1, 4, side, side, generator=g), conds, sigma


def _sd3_deep(pack, side: int):
    """SD3.5's layout (dual attention in block 0) with 4 blocks, width 256, positions up to 64x64 latents."""
    from diffusers import SD3Transformer2DModel

    from tools.families.base import load_detected, seeded

    twin = seeded(SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=4,
                                        attention_head_dim=64, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=256, pooled_projection_dim=32, pos_embed_max_size=32,
                                        qk_norm="rms_norm", dual_attention_layers=(0,)), 0)
    patcher = load_detected(twin.state_dict())
    g = torch.Generator().manual_seed(1)
    conds = {"c_crossattn": torch.randn(1, 77, 32, generator=g), "y": torch.randn(1, 32, generator=g)}
    return "SD3.5 layout, 4 blocks, width 256", patcher, torch.randn(1, 16, side, side, generator=g), conds, \
        torch.tensor([0.5])


def _flux_deep(pack, side: int):
    """Flux.1's layout with 4 double and 8 single blocks, width 256."""
    from diffusers import FluxTransformer2DModel

    from tools.families.base import load_detected, seeded

    twin = seeded(FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                         attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                         pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                  0)
    patcher = load_detected(twin.state_dict(), {"num_heads": 2})
    g = torch.Generator().manual_seed(1)
    conds = {"c_crossattn": torch.randn(1, 64, 256, generator=g), "y": torch.randn(1, 64, generator=g),
             "guidance": torch.tensor([1.0])}
    return "Flux, 4 double + 8 single blocks", patcher, torch.randn(1, 16, side, side, generator=g), conds, \
        torch.tensor([0.5])


def measure(pack, name: str, side: int) -> dict:
    if name == "sdxl_depths":
        title, patcher, x, conds, sigma = _sdxl_depths(pack, side)
    elif name == "sd3_deep":
        title, patcher, x, conds, sigma = _sd3_deep(pack, side)
    elif name == "flux_deep":
        title, patcher, x, conds, sigma = _flux_deep(pack, side)
    else:
        title, patcher, x, conds, sigma = _family(pack, name, side)
    found = pack.engine.train_targets.trainable_targets(patcher.model, TARGETS)
    modules = tmem.modules_for(pack, patcher, found, RANK, RANK)
    row = {"model": title, "latent": list(x.shape), "targets": len(found)}
    for on in (False, True):
        s = pack.engine.training.TrainSettings(rank=RANK, min_rank=MIN_RANK, targets=TARGETS,
                                               gradient_checkpointing=on)
        st = tmem.one_step(pack, patcher, found, modules, s, x, sigma, conds)
        row["on" if on else "off"] = {"kept_bytes": st.forward_bytes, "peak_bytes": st.peak_bytes,
                                      "layers_recomputed": st.rerun, "layers": st.layers, "saved_copies": st.copies,
                                      "step_s": round(st.seconds, 2)}
    off, on = row["off"], row["on"]
    row["kept_saved"] = round(1 - on["kept_bytes"] / off["kept_bytes"], 3)
    row["peak_saved"] = round(1 - on["peak_bytes"] / off["peak_bytes"], 3)
    return row


def table(rows: dict) -> str:
    mib = 2 ** 20
    lines = ["| model | latent | kept, off → on | peak, off → on | peak saved | layers recomputed |",
             "|---|---|---|---|---|---|"]
    for r in rows.values():
        if "error" in r:
            continue
        off, on = r["off"], r["on"]
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['latent'][1:]))} | {off['kept_bytes'] / mib:.1f} → "
                     f"{on['kept_bytes'] / mib:.1f} MiB ({r['kept_saved']:.0%} less) | {off['peak_bytes'] / mib:.1f} "
                     f"→ {on['peak_bytes'] / mib:.1f} MiB | **{r['peak_saved']:.0%}** | {on['layers_recomputed']} "
                     f"of {on['layers']}{' (saved copies)' if on['saved_copies'] else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"comma-separated, of {', '.join([*FAMILY_SIDES, *DEEP])}")
    ap.add_argument("--side", type=int, help="latent side for every model")
    ap.add_argument("--smoke", action="store_true", help="three models at 16x16")
    ap.add_argument("--full-size", action="store_true", help="full-size models on the meta device")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pack = import_pack()
    sides = dict(SMOKE) if args.smoke else {**FAMILY_SIDES, **dict.fromkeys(DEEP, 64)}
    if args.full_size:
        from benchmarks import checkpointing_full_size as full

        sides = dict.fromkeys(full.models(), 0)
    if args.models:
        sides = {m: sides.get(m, FAMILY_SIDES.get(m, 64)) for m in args.models.split(",")}
    rows = {}
    for name, side in sides.items():
        try:
            rows[name] = full.measure(pack, name) if args.full_size else measure(pack, name, args.side or side)
        except Exception as e:  # one model's failure is reported, the others still run
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"{name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    out = {"bench": "checkpointing", "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "comfyui": host_version(),
           "rank": 64 if args.full_size else RANK, "targets": TARGETS, "rows": rows}
    print(json.dumps(out, indent=1))
    print(table(rows), file=sys.stderr)
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
