"""GGUF checkpoints through ComfyUI-GGUF's own loader (on demand: that pack is not on PyPI, so `make test` cannot
install it; CI tests the refusal of tensors nothing can dequantize instead).

    python scripts/check_gguf.py --gguf-pack /path/to/ComfyUI-GGUF [--quants Q8_0,Q4_0]

Writes the tiny SDXL twin as GGUF files with the `gguf` package (the way ComfyUI-GGUF's convert tool does), loads
each with ComfyUI-GGUF's `UnetLoaderGGUF`, and measures, as tests/comfy/test_storage.py does, the T-LoRA's effect
against the exact effect on that loaded model, for a LyCORIS file (base rebuilt from the GGUF weights, read with
ComfyUI-GGUF's own dequantizer) and for its self-contained copy; and Load LoRA (timestep schedule) with a kohya LoRA
(LoCon convs included) at constant strength, against the exact LoRA on the same dequantized base, beside
ComfyUI-GGUF's own LoRA route (`LoraLoader` on its model: patches applied at each dequantize). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

R, MIN_RANK, ALPHA = 8, 3, 1.7


def load_gguf_pack(path: Path):
    """ComfyUI-GGUF imported the way ComfyUI imports a custom node (module named by its folder's path)."""
    spec = importlib.util.spec_from_file_location(str(path), path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[str(path)] = mod
    spec.loader.exec_module(mod)
    return mod


def write_gguf(sd: dict[str, torch.Tensor], path: Path, quant: str) -> None:
    """ComfyUI keys -> a GGUF file: 2-D Linear weights in `quant` where their rows fit its blocks, the rest F16/F32."""
    import gguf

    q = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[q][0]
    w = gguf.GGUFWriter(path=None, arch="sdxl")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in sd.items():
        a = v.float().numpy()
        kind = gguf.GGMLQuantizationType.F32 if a.ndim <= 1 else gguf.GGMLQuantizationType.F16
        if k.endswith(".weight") and a.ndim == 2 and a.shape[-1] % block == 0:
            kind = q
        w.add_tensor(k, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file(path=str(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf-pack", required=True, type=Path, help="a checkout of city96/ComfyUI-GGUF")
    ap.add_argument("--quants", default="Q8_0,Q4_0")
    ap.add_argument("--dequant-dtype", default="default",
                    help="ComfyUI-GGUF's dequant_dtype (default: its fp16 block math; float32: exact)")
    args = ap.parse_args(argv)
    from tools import storage
    from tools import tiny_models as tm
    from tools.families import FAMILIES
    from tools.families.base import capture, exact_bases, rel_l2, sigma_for
    from tools.harness.inproc import import_pack
    from tools.standard_lora import standard_lora

    pack = import_pack()
    import folder_paths

    gguf_pack = load_gguf_pack(args.gguf_pack.resolve())
    fam = FAMILIES["sdxl"]
    twin = fam.build(21)
    tmp = Path(tempfile.mkdtemp(prefix="tlora_gguf_"))
    lora = tmp / "pytorch_lora_weights.safetensors"
    net = tm.write_lycoris_tlora(twin.diffusers, lora, R, R, targets=fam.targets, seed=4, strength=1.0)
    contained = pack.engine.save.save_with_base(twin.patcher, str(lora), str(tmp / "with_base.safetensors"), "twin")
    exact = exact_bases(net)
    sd = {k.removeprefix("diffusion_model."): v.clone() for k, v in twin.patcher.model.state_dict().items()
          if k.startswith("diffusion_model.")}
    folder_paths.add_model_folder_path("diffusion_models", str(tmp))
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(3))
    apply = pack.engine.apply
    import comfy.sd
    from safetensors.torch import save_file

    plain = standard_lora(twin.patcher, "sdxl")
    save_file(plain, str(tmp / "plain_lora.safetensors"))
    sched = pack.engine.scheduled
    const = pack.tlora_core.strength.StrengthCurve(0.0, 1.0, 1.0, 1.0, "constant")
    rows = []
    for quant in args.quants.split(","):
        write_gguf(sd, tmp / f"sdxl_{quant}.gguf", quant)
        loaded = gguf_pack.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(f"sdxl_{quant}.gguf",
                                                                              args.dequant_dtype)[0]
        tls = {w: pack.tlora_core.load_tlora(p) for w, p in (("rebuilt", lora), ("self_contained", contained))}
        targets = pack.engine.plan.plan(loaded, tls["rebuilt"]).targets
        kind = pack.engine.weights.layer_weight(loaded, targets[0].key).kind
        values = storage.values(pack, loaded)
        clones = {w: apply.apply_tlora(loaded, t, apply.Settings(1.0, R, MIN_RANK, ALPHA))[0] for w, t in tls.items()}
        errors = {w: 0.0 for w in clones}
        for t in (999, 500, 0):
            sigma = sigma_for(loaded, t, fam.flow)
            rank = pack.engine.patcher.RankState("r", R, MIN_RANK, ALPHA, "auto").ranks_for(
                sigma, loaded.model.model_sampling)[1][0]
            ref, ref_base = storage.reference(twin.patcher, net, exact, values, targets, x, sigma, conds, rank)
            base = capture(loaded, x, sigma, conds).out
            for w, c in clones.items():
                errors[w] = max(errors[w], rel_l2(capture(c, x, sigma, conds).out - base, ref - ref_base))
        # a scheduled standard LoRA at constant strength: its effect against the exact LoRA on the same values
        deq = {k.removeprefix("diffusion_model."): v for k, v in values.items() if k.startswith("diffusion_model.")}
        exact_base = storage.load(storage.write(deq, "float32", tmp / f"deq_{quant}.safetensors"), "float32")
        ours = sched.apply_scheduled_lora(loaded, sched.read_lora(str(tmp / "plain_lora.safetensors")), 0.8,
                                          const)[0]
        stock_gguf = comfy.sd.load_lora_for_models(loaded, None, plain, 0.8, 0)[0]
        sigma = sigma_for(loaded, 500, fam.flow)
        exact_b = capture(exact_base, x, sigma, conds).out
        want = capture(comfy.sd.load_lora_for_models(exact_base, None, plain, 0.8, 0)[0], x, sigma, conds).out
        base = capture(loaded, x, sigma, conds).out
        scheduled = {"scheduled_lora": rel_l2(capture(ours, x, sigma, conds).out - base, want - exact_b),
                     "gguf_stock_lora": rel_l2(capture(stock_gguf, x, sigma, conds).out - base, want - exact_b),
                     "base_vs_dequantized": rel_l2(base, exact_b)}
        rows.append({"quant": quant, "dequant_dtype": args.dequant_dtype, "loaded_as": kind,
                     **{w: round(e, 6) for w, e in errors.items()}, **{k: float(f"{v:.3g}") for k, v in
                                                                      scheduled.items()}})
    net.restore()
    print(json.dumps({"gguf": rows}))


if __name__ == "__main__":
    main()
