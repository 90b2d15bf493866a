"""Text-encoder modules of a T-LoRA file: no timestep reaches a text encoder, so they apply at full rank, statically,
on the Load T-LoRA node's `clip` input. A tiny CLIP text encoder (ComfyUI's own CLIP class with a small config,
and its transformers twin with the same weights); a LyCORIS `tlora` network written by LyCORIS on the twin, its
modules named the way kohya-style LyCORIS names text-encoder modules (`lora_te_...`); the node's output CLIP
against the twin with LyCORIS applied (no mask: every rank)."""

from __future__ import annotations

import functools

import pytest
import torch

from tools import tiny_models as tm
from tools.families.base import rel_l2

CONFIG = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
          "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 32, "initializer_factor": 1.0,
          "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
          "model_type": "clip_text_model", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 1,
          "projection_dim": 32, "torch_dtype": "float32", "vocab_size": 49408}
RANK = 4


def comfy_clip(state_dict: dict, dtype: torch.dtype = torch.float32):
    """ComfyUI's CLIP object (SD1 tokenizer, CLIP-L structure) at the tiny config, holding `state_dict` stored in
    `dtype` (fp8: ComfyUI's manual-cast layers, computing in float32)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    model = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=comfy.sd1_clip.SDClipModel,
                              textmodel_json_config=CONFIG)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, model)
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
    missing, unexpected = clip.load_sd({k if k.startswith("text_model.") else f"text_model.{k}": v
                                        for k, v in state_dict.items()})
    assert not [k for k in missing if k != "text_projection.weight"] and not unexpected, (missing, unexpected)
    return clip


def test_text_encoder_modules_apply_at_full_rank_through_the_clip_input(pack, tmp_path):
    import folder_paths
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    te = tm.fill_random_(CLIPTextModel(CLIPTextConfig(**CONFIG)), 3)
    clip = comfy_clip(te.state_dict())
    net = tm.lycoris_network(te, RANK, RANK, ["CLIPAttention", "CLIPMLP"])
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for lora in net.loras:  # "training": the factors move off their SVD init
            for w in (lora.q_layer.weight, lora.p_layer.weight):
                w.add_(w.std() * torch.randn(w.shape, generator=g))
    folder = tmp_path / "loras"
    folder.mkdir()
    raw = tmp_path / "raw.safetensors"
    net.save_weights(str(raw), torch.float32, None)
    # kohya-style LyCORIS names text-encoder modules lora_te_<path from the CLIP text model>
    prefix = "lora_te_" if any(n.startswith("text_model") for n, _ in te.named_modules()) else "lora_te_text_model_"
    save_file({k.replace("lycoris_", prefix, 1): v for k, v in load_file(str(raw)).items()},
              str(folder / "te_tlora.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    folder_paths.add_model_folder_path("loras", str(folder))
    try:
        tl = pack.tlora_core.load_tlora(folder / "te_tlora.safetensors")
        assert not tl.modules and len(tl.text_encoder_modules) == len(net.loras) == 12
        node = pack.nodes.loader.TLoRALoader
        model = object()  # no diffusion-model modules in the file: the model passes through untouched
        out = node.execute(model=model, lora_name="te_tlora.safetensors", strength_model=1.0, strength_clip=1.0,
                           schedule_source="file", min_rank=1, alpha=1.0, max_rank=0, timestep_mode="auto",
                           vanilla_tlora=False, clip=clip)
    finally:
        folder_paths.get_folder_paths("loras").remove(str(folder))
    out_model, out_clip = out.result
    assert out_model is model and out_clip is not clip
    tokens = clip.tokenize("a photo of a cat riding a bicycle")
    ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
    with torch.no_grad():
        ours = out_clip.encode_from_tokens(tokens)
        base = clip.encode_from_tokens(tokens)
        ref = te(ids).last_hidden_state  # LyCORIS applied, no mask: every rank
        net.restore()
        ref_base = te(ids).last_hidden_state
    assert rel_l2(base, ref_base) < 1e-5, "the twins differ without the T-LoRA"
    assert rel_l2(ref, ref_base) > 1e-2, "the T-LoRA has no measurable effect"
    assert rel_l2(ours - base, ref - ref_base) < 1e-4
    assert rel_l2(ours, ref) < 1e-5


def _te_file(pack, te, folder, seed=1):
    """A kohya-style LyCORIS T-LoRA with text-encoder modules only, written by LyCORIS on `te`."""
    from safetensors.torch import load_file, save_file

    net = tm.lycoris_network(te, RANK, RANK, ["CLIPAttention", "CLIPMLP"])
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for lora in net.loras:
            for w in (lora.q_layer.weight, lora.p_layer.weight):
                w.add_(w.std() * torch.randn(w.shape, generator=g))
    raw = folder / "raw.safetensors"
    net.save_weights(str(raw), torch.float32, None)
    net.restore()
    out = folder / "te_only.safetensors"
    sd = load_file(str(raw))  # LyCORIS names the modules from the CLIP text model down: kohya adds text_model_
    prefix = "lora_te_" if next(iter(sd)).startswith("lycoris_text_model_") else "lora_te_text_model_"
    save_file({k.replace("lycoris_", prefix, 1): v for k, v in sd.items()}, str(out),
              metadata={"ss_network_module": "lycoris.kohya"})
    return out


def _patches(clip) -> dict:
    return {k: v[-1][1][1][0] for k, v in clip.patcher.patches.items()}  # key -> the T-LoRA's static diff


@pytest.mark.parametrize("storage", ["fp8", "stock_lora_patched"])
def test_text_encoder_base_is_read_through_the_layer_whatever_the_storage(pack, tmp_path, monkeypatch, storage):
    """An fp8 CLIP: the base is the SVD of the weights the layers compute with (fp8 dequantized), not of raw bytes.
    A CLIP a stock LoRA has patched (and loaded, so the patch is baked into its weights): the base is the SVD of the
    original weights. Both are cached: a second execution does no SVD."""
    import comfy.model_management
    from transformers import CLIPTextConfig, CLIPTextModel

    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd_cache"))
    te = tm.fill_random_(CLIPTextModel(CLIPTextConfig(**CONFIG)), 4)
    path = _te_file(pack, te, tmp_path)
    tl = pack.tlora_core.load_tlora(path)
    plain = comfy_clip(te.state_dict())
    want = _patches(pack.engine.apply_text_encoder(plain, tl, 1.0))  # the exact fp32 base
    if storage == "fp8":
        clip = comfy_clip(te.state_dict(), torch.float8_e4m3fn)
        kinds = {pack.engine.weights.layer_weight(clip.patcher, k).kind for k in want}
        assert kinds == {"fp8"}, kinds
    else:
        clip = comfy_clip(te.state_dict())
        stock = {k: ("diff", (torch.randn_like(v) * 0.1,)) for k, v in list(want.items())[:4]}
        clip.add_patches(stock, 1.0)
        comfy.model_management.load_models_gpu([clip.patcher])  # the stock patch baked into the weights
        baked = next(iter(stock))
        assert not torch.equal(comfy_get(clip, baked), comfy_get(plain, baked)), "the stock LoRA is not baked in"
    before = pack.engine.bases.stats.snapshot()
    got = _patches(pack.engine.apply_text_encoder(clip, tl, 1.0))
    if storage == "fp8":  # other values than the fp32 CLIP's: decomposed afresh
        assert pack.engine.bases.stats["svd"] > before["svd"]
    else:  # the original weights, whose bases the fp32 CLIP already put in the SVD cache
        assert pack.engine.bases.stats["svd"] == before["svd"]
    assert set(got) == set(want)
    names = {k.rsplit(".", 1)[0].replace(".", "_"): n for n in tl.text_encoder_modules for k in want
             if k.rsplit(".", 1)[0].replace(".", "_").endswith(n.split("text_model_", 1)[1])}
    assert len(names) == len(want)
    for k in want:
        base = pack.engine.weights.layer_weight(clip.patcher, k).dequantized()
        u, s, v = pack.tlora_core.svd.top_singular(base, RANK)
        adapter = tl.text_encoder_modules[names[k.rsplit(".", 1)[0].replace(".", "_")]]
        exact = adapter.with_base(u, s, v).delta_weight(RANK)
        assert torch.allclose(got[k], exact, atol=1e-6 * exact.abs().max()), k
        if storage == "stock_lora_patched":  # the original weights: the same delta as on the unpatched CLIP
            assert torch.allclose(got[k], want[k], atol=1e-5 * want[k].abs().max()), k
    again = pack.engine.bases.stats.snapshot()
    pack.engine.apply_text_encoder(clip, tl, 0.5)
    assert pack.engine.bases.stats["svd"] == again["svd"], "re-execution ran the SVD again"


def comfy_get(clip, key):
    import comfy.utils

    return comfy.utils.get_attr(clip.cond_stage_model, key).detach().clone()


def test_enferlain_clip_modules_map_and_apply_at_full_rank(pack, tmp_path):
    """Enferlain/sd-scripts names text-encoder modules `tlora_clip_l_<transformers path>` and stores their base;
    they map onto ComfyUI's CLIP-L and apply unmasked (its trainer never masked them), equal to the twin with
    the formula's full-rank weight change added."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from tools import writer_files as wf

    te = tm.fill_random_(CLIPTextModel(CLIPTextConfig(**CONFIG)), 3)
    clip = comfy_clip(te.state_dict())
    linears = {n: m for n, m in te.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    full = {n: n if n.startswith("text_model.") else f"text_model.{n}" for n in linears}  # transformers' own path
    layers = [wf.Layer("tlora_clip_l_" + full[n].replace(".", "_"), m.out_features, m.in_features)
              for n, m in linears.items()]
    path = tmp_path / "enferlain_te.safetensors"
    factors = wf.write_ortho(path, layers, RANK, 2.0, {"ss_adapter_module": "library.adapters.tlora"}, seed=2)
    tl = pack.tlora_core.load_tlora(path)
    assert tl.writer.id == "enferlain" and not tl.modules and len(tl.text_encoder_modules) == len(linears) == 12
    out = pack.engine.apply_text_encoder(clip, tl, 1.0)
    tokens = clip.tokenize("a photo of a cat riding a bicycle")
    ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
    with torch.no_grad():
        ours, base = out.encode_from_tokens(tokens), clip.encode_from_tokens(tokens)
        for m, layer in zip(linears.values(), layers, strict=True):
            f = {k: v.double() for k, v in factors[layer.name].items()}
            m.weight += ((2.0 / RANK) * ((f["p"] * f["lam"]) @ f["q"] - (f["p0"] * f["lam0"]) @ f["q0"])).float()
        ref = te(ids).last_hidden_state
    assert rel_l2(ours - base, ref - base) < 1e-4 and rel_l2(ref, base) > 1e-2
