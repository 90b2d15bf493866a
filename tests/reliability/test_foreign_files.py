"""Foreign files (a model, a VAE) in the loras folder are recognised from their tensor names alone: the error
comes without reading their tensors (a real checkpoint is gigabytes, read into the server's memory for nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlora_core import TLoRAError, fileio, load_tlora


class _CountingSafeOpen:
    """safe_open that counts get_tensor calls."""

    reads = 0

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        outer = self

        class Handle:
            def __enter__(self):
                self.f = outer.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def metadata(self):
                return self.f.metadata()

            def keys(self):
                return self.f.keys()

            def get_tensor(self, k):
                outer.reads += 1
                return self.f.get_tensor(k)

        return Handle()


@pytest.mark.parametrize(("which", "cause"), [
    (("sdxl", "comfy_file"), "a diffusion-model weight file, not a LoRA"),
    (("sd15", "comfy_file"), "a diffusion-model weight file, not a LoRA"),
    (("vae", "vae_4ch"), "a VAE, not a LoRA"),
])
def test_foreign_file_rejected_by_names_without_reading_tensors(tiny, monkeypatch, which, cause):
    counting = _CountingSafeOpen(fileio.safe_open)
    monkeypatch.setattr(fileio, "safe_open", counting)
    path = Path(tiny[which[0]][which[1]])
    with pytest.raises(TLoRAError) as e:
        load_tlora(path)
    assert str(e.value) == f"T-LoRA file '{path.name}': {cause}"
    assert counting.reads == 0


def test_tlora_file_is_still_read(sdxl_tlora_file, monkeypatch):
    counting = _CountingSafeOpen(fileio.safe_open)
    monkeypatch.setattr(fileio, "safe_open", counting)
    tl = load_tlora(sdxl_tlora_file)
    assert tl.format == "lycoris_tlora" and counting.reads == 4 * len(tl.modules)
