"""Train T-LoRA on datasets as ComfyUI's dataset nodes give them (tiny SD1.5): three images at two sizes with their
own captions train through `engine.training.train` and the node's `execute`; every model call is one size and
carries the caption of the images in it (recorded at the diffusion model's input); caption dropout; masked loss
(zero gradient outside the mask's square); resume of a bucketed run continues exactly."""

from __future__ import annotations

import os

import pytest
import torch

from tests.comfy.test_train_record import _node_inputs
from tests.comfy.test_training import _conditioning
from tests.comfy.test_training_resume import _assert_same_factors
from tools.families import FAMILIES

R, MIN_RANK = 4, 2
SIZES = ((8, 8), (8, 8), (8, 12))  # latent h, w of the three images (64x64, 64x64, 64x96 px)


def _settings(pack, **kw):
    base = {"steps": 8, "learning_rate": 1e-2, "rank": R, "min_rank": MIN_RANK, "linear_alpha": 2.0,
            "targets": "attention", "seed": 5, "batch_size": 2, "gradient_checkpointing": False}
    return pack.engine.training.TrainSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    fam = FAMILIES["sd15"]
    twin = fam.build(61)
    os.environ["TLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("svd"))
    g = torch.Generator().manual_seed(4)
    latents = [torch.randn(1, 4, h, w, generator=g) * 0.5 for h, w in SIZES]
    captions = [_conditioning(fam, twin, seed=10 + i) for i in range(len(SIZES))]  # each [[tokens, {}]]
    return fam, twin, latents, captions


class Seen:
    """What the diffusion model is called with: the latent's shape, the context (caption tokens), and, with
    `grads`, the gradient of the loss with respect to the model's output."""

    def __init__(self, model: torch.nn.Module, grads: bool = False):
        self.shapes: list[tuple[int, ...]] = []
        self.contexts: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if grads:
            self._hooks.append(model.register_forward_hook(self._post))

    def _pre(self, module, args, kwargs):
        self.shapes.append(tuple(args[0].shape))
        self.contexts.append(kwargs["context"].detach().float().cpu().clone())

    def _post(self, module, args, out):
        out.register_hook(lambda g: self.grads.append(g.detach().float().cpu().clone()))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _train(pack, twin, latents, positive, s, out, **kw):
    seen = Seen(twin.patcher.model.diffusion_model, grads=kw.pop("grads", False))
    try:
        with torch.inference_mode():
            res = pack.engine.training.train(twin.patcher, latents, positive, s, str(out), **kw)
    finally:
        seen.close()
    assert len(seen.shapes) == len(res.calls) + 1  # the first: the probe before the steps
    return res, seen


def _caption_index(context: torch.Tensor, captions: list) -> int:
    hits = [i for i, c in enumerate(captions) if torch.equal(context, c[0][0].float().expand_as(context))]
    assert len(hits) == 1, f"the context is no caption of the dataset ({len(hits)} matches)"
    return hits[0]


def test_three_images_at_two_sizes_train_each_call_one_size_with_each_images_caption(pack, sd15, tmp_path):
    """MakeTrainingDataset's lists (one LATENT and one CONDITIONING per image): both sizes train, every model call is
    one size, every image is seen, and the caption a call carries is the caption of each image in it."""
    fam, twin, latents, captions = sd15
    res, seen = _train(pack, twin, latents, captions, _settings(pack, steps=10), tmp_path / "three.safetensors")
    calls = res.calls
    images_seen = {i for c in calls for i in c["images"]}
    print(f"{len(calls)} calls, shapes {sorted(set(seen.shapes[1:]))}, images per call "
          f"{[c['images'] for c in calls]}, losses {res.losses[0]:.4g} -> {res.losses[-1]:.4g}")
    assert images_seen == {0, 1, 2}
    assert {s[2:] for s in seen.shapes[1:]} == set(SIZES)  # both sizes reached the model
    for call, shape, context in zip(calls, seen.shapes[1:], seen.contexts[1:], strict=True):
        assert shape[0] == len(call["images"]) and {SIZES[i] for i in call["images"]} == {shape[2:]}, (call, shape)
        assert {_caption_index(context, captions)} == set(call["images"]) == {call["caption"]}, call
    assert all(torch.isfinite(torch.tensor(res.losses))) and len(res.losses) == 10
    assert os.path.isfile(res.path)


def _resolution_buckets(latents, captions):
    """ResolutionBucket's outputs (one batched LATENT per size, one list of entries per size): ComfyUI's own node
    where the host has it (0.33); 0.3.75 has none, so the same lists are made here."""
    try:
        from comfy_extras.nodes_dataset import ResolutionBucket
    except ImportError:
        ResolutionBucket = None
    if ResolutionBucket is not None:
        out = ResolutionBucket.execute(latents=[{"samples": t} for t in latents], conditioning=captions)
        return list(out.result[0]), list(out.result[1])
    return ([{"samples": torch.cat(latents[:2])}, {"samples": latents[2]}],
            [[captions[0][0], captions[1][0]], [captions[2][0]]])


@pytest.mark.parametrize("layout", ["per image", "ResolutionBucket"])
def test_the_node_trains_the_dataset_lists_comfyui_gives(pack, sd15, tmp_path, layout):
    """The node's `execute` with the list shapes of MakeTrainingDataset (with a mask per image) and of
    ResolutionBucket: each call one size, the 64x96 image always with its own caption."""
    import folder_paths

    fam, twin, latents, captions = sd15
    if layout == "per image":
        lat, pos = [{"samples": t} for t in latents], captions
        extra = {"masks": [torch.ones(1, h * 8, w * 8) for h, w in SIZES]}
    else:
        lat, pos = _resolution_buckets(latents, captions)
        extra = {}
        assert [t["samples"].shape[0] for t in lat] == [2, 1] and [len(c) for c in pos] == [2, 1]
    values = {"preset": "custom", "steps": 8, "rank": R, "min_rank": MIN_RANK, "learning_rate": 1e-2,
              "batch_size": 2, "filename": "data/node", "gradient_checkpointing": False, "seed": 3}
    folder = tmp_path / "loras"
    folder.mkdir()
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    seen = Seen(twin.patcher.model.diffusion_model)
    try:
        with torch.inference_mode():
            res = pack.nodes.train.TLoRATrain.execute(model=[twin.patcher], latents=lat, positive=pos,
                                                      **_node_inputs(pack, **values), **extra)
    finally:
        seen.close()
        folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))
    assert (folder / "data" / "node.safetensors").is_file() and len(res.result[1]["loss"]) == 8
    by_size: dict[tuple, set] = {}
    for shape, context in zip(seen.shapes, seen.contexts, strict=True):
        by_size.setdefault(shape[2:], set()).add(_caption_index(context, captions))
    print(f"{layout}: captions by latent size {by_size}")
    assert by_size[(8, 12)] == {2} and by_size[(8, 8)] <= {0, 1} and set(by_size) == {(8, 8), (8, 12)}


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_caption_dropout_trains_with_the_empty_caption(pack, sd15, tmp_path, p):
    """At 1.0 every call carries the empty caption (the captions zeroed, as ConditioningZeroOut does; or the empty
    conditioning given), at 0 none does."""
    fam, twin, latents, captions = sd15
    s = _settings(pack, steps=4, caption_dropout=p)
    res, seen = _train(pack, twin, latents, captions, s, tmp_path / "zero.safetensors")
    zeroed = [bool(torch.count_nonzero(c) == 0) for c in seen.contexts[1:]]
    assert zeroed == [p == 1.0] * len(res.calls), zeroed
    assert {c["caption"] for c in res.calls} == ({-1} if p == 1.0 else {c["images"][0] for c in res.calls})
    empty = _conditioning(fam, twin, seed=99)
    res, seen = _train(pack, twin, latents, captions, s, tmp_path / "given.safetensors", empty=empty)
    given = [torch.equal(c, empty[0][0].float().expand_as(c)) for c in seen.contexts[1:]]
    assert given == [p == 1.0] * len(res.calls), given


def test_a_mask_zero_outside_a_square_gives_zero_gradient_from_outside_it(pack, sd15, tmp_path):
    """A 64x64 px mask of ones on the square [16, 48) px: the gradient of the loss with respect to the model's output
    is exactly zero outside the latent square [2, 6) and not inside; without the mask it is not zero outside."""
    fam, twin, latents, captions = sd15
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    s = _settings(pack, steps=3)
    _, seen = _train(pack, twin, latents[:1], captions[:1], s, tmp_path / "masked.safetensors", masks=[mask],
                     grads=True)
    _, plain = _train(pack, twin, latents[:1], captions[:1], s, tmp_path / "plain.safetensors", grads=True)
    out_masked = max(float(g[..., ~inside].abs().max()) for g in seen.grads)
    in_masked = min(float(g[..., inside].abs().max()) for g in seen.grads)
    out_plain = min(float(g[..., ~inside].abs().max()) for g in plain.grads)
    print(f"|grad| outside the square: masked {out_masked:.3g}, unmasked {out_plain:.3g}; inside, masked "
          f"{in_masked:.3g}")
    assert len(seen.grads) == 4 and out_masked == 0.0 and in_masked > 0 and out_plain > 0


def test_a_uniform_mask_trains_as_no_mask(pack, sd15, tmp_path):
    """The masked loss is the weighted mean (sum of mask * error over the sum of the mask): a mask of 0.5 everywhere
    trains exactly as no mask (a plain mean of mask * error would halve the loss)."""
    fam, twin, latents, captions = sd15
    s = _settings(pack, steps=3)
    half = [torch.full((1, h * 8, w * 8), 0.5) for h, w in SIZES]
    masked, _ = _train(pack, twin, latents, captions, s, tmp_path / "half.safetensors", masks=half)
    plain, _ = _train(pack, twin, latents, captions, s, tmp_path / "none.safetensors")
    assert masked.losses == pytest.approx(plain.losses, rel=1e-6, abs=0)
    _assert_same_factors(masked.path, plain.path)


def test_a_mask_of_another_size_is_refused(pack, sd15, tmp_path):
    fam, twin, latents, captions = sd15
    with pytest.raises(pack.tlora_core.TLoRAError) as e, torch.inference_mode():
        pack.engine.training.train(twin.patcher, latents, captions, _settings(pack), str(tmp_path / "no.safetensors"),
                                   masks=[torch.ones(3, 64, 64)])
    assert "mask 2 is 64x64 px but its image's latent is 12x8" in str(e.value), str(e.value)


def test_a_bucketed_run_with_caption_dropout_resumes_exactly(pack, sd15, tmp_path):
    """3 steps, a checkpoint, 3 more from it equal 6 straight: the bucket, image and dropout draws come from the
    loop's generator, which the state carries."""
    fam, twin, latents, captions = sd15
    s = _settings(pack, caption_dropout=0.5)
    straight, _ = _train(pack, twin, latents, captions, _settings(pack, steps=6, save_every=3, caption_dropout=0.5),
                         tmp_path / "straight.safetensors")
    more, _ = _train(pack, twin, latents, captions, _settings(pack, steps=3, caption_dropout=0.5),
                     tmp_path / "more.safetensors", resume=str(tmp_path / "straight_step3.safetensors"))
    assert s.caption_dropout == 0.5 and {c["caption"] for c in straight.calls} >= {-1}
    assert more.losses == pytest.approx(straight.losses, rel=1e-6, abs=0)
    assert [c["images"] for c in more.calls] == [c["images"] for c in straight.calls[-len(more.calls):]]
    _assert_same_factors(more.path, straight.path)
