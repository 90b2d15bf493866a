"""Self-contained LyCORIS T-LoRA files: the trained factors plus the SVD base they were trained against.

A LyCORIS `tlora` file does not store its base (the top-r singular triplets of the base weights); it is rebuilt
from whatever checkpoint is loaded, so an fp8 or GGUF copy of the right checkpoint gives a slightly different
base. A self-contained file stores the base, built once from the checkpoint the T-LoRA was trained on, under
the names of LyCORIS' own buffers (`<module>.base_q` (r, in), `.base_p` (out, r), `.base_lambda` (1, r)): LyCORIS
still reads the file (`create_lycoris_from_weights` ignores the extra tensors; once the network is applied,
`load_weights` / `load_state_dict` fill its `base_*` buffers with them, so LyCORIS too runs the stored base).
Metadata `tlora_base` records where the base came from and a digest of it,
so an edited or truncated base is refused and a base from another checkpoint is reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .digest import BASE_SUFFIXES, FORMAT_VERSION, checkpoint_digest, stored_base_digest
from .errors import TLoRAError
from .formats import BASE_METADATA, TLoRA
from .layouts import LYCORIS
from .svd import Triplets


def source_record(checkpoint: str, weight_digests: Mapping[str, str], storage: set[str] | list[str],
                  created_by: str) -> dict[str, Any]:
    """Where a stored base comes from, as every writer records it: the checkpoint's name, `checkpoint_digest` of
    the weights the base was built from (`digest.weight_digest` per module), their storage, and the writer."""
    return {"checkpoint": checkpoint.strip() or "unnamed", "checkpoint_digest": checkpoint_digest(weight_digests),
            "storage": ",".join(sorted(set(storage))), "created_by": created_by}


def base_tensors(tl: TLoRA, triplets: Mapping[str, Triplets]) -> dict[str, torch.Tensor]:
    """The stored-base tensors of every diffusion-model module, in LyCORIS' buffer layout (float32)."""
    out = {}
    for name, a in sorted(tl.modules.items()):
        if name not in triplets:
            raise TLoRAError(tl.path, f"no SVD base for module '{name}'")
        u, s, v = (t.detach().float().cpu() for t in triplets[name])
        tail = (1, 1) if a.conv else ()
        out[f"{name}.base_q"] = v.T.contiguous().reshape(a.rank, a.in_features, *tail)
        out[f"{name}.base_p"] = u.contiguous().reshape(a.out_features, a.rank, *tail)
        out[f"{name}.base_lambda"] = s.reshape(1, a.rank).contiguous()
    return out


def write_self_contained(tl: TLoRA, triplets: Mapping[str, Triplets], out_path: str,
                         source: Mapping[str, Any]) -> str:
    """Write `tl` (a LyCORIS T-LoRA) with its SVD base to `out_path`; returns the path.

    `source` describes the checkpoint the base came from (name, digest of its targeted weights, storage); the
    schedule the file records (file metadata or sidecars) is written into the metadata too."""
    if tl.format != LYCORIS:
        raise TLoRAError(tl.path, f"only LyCORIS T-LoRA files need a stored base; this one is {tl.format}")
    if os.path.abspath(out_path) == os.path.abspath(tl.path):
        raise TLoRAError(tl.path, "refusing to overwrite the input file: choose another output name")
    with safe_open(tl.path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(BASE_SUFFIXES)}
    base = base_tensors(tl, triplets)
    tensors.update(base)
    metadata = {k: v for k, v in tl.metadata.items() if k != BASE_METADATA}
    for field_name, key in (("max_rank", "linear_dim"), ("min_rank", "tlora_min_rank"), ("alpha", "tlora_alpha")):
        if field_name in tl.recorded:
            metadata.setdefault(key, str(tl.recorded[field_name][0]))
    info = {"version": FORMAT_VERSION, **source, "layers": len(tl.modules), "digest": stored_base_digest(base)}
    metadata[BASE_METADATA] = json.dumps(info, sort_keys=True)
    return write_atomically(tensors, out_path, metadata)


def write_atomically(tensors: Mapping[str, torch.Tensor], out_path: str, metadata: Mapping[str, str],
                     before_replace: Callable[[], None] | None = None) -> str:
    """A safetensors file written to a temporary name and renamed into place: readers never see a partial file, and
    a failed write leaves nothing behind. `before_replace` runs once the file is written, just before the rename
    (the files that go with it are put in place there: if they fail, the old file stays)."""
    tmp = f"{out_path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        if before_replace is not None:
            before_replace()
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out_path
