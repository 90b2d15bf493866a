"""Content digests, kept apart by what they protect.

  cache key         `cache_key`: names an SVD cache entry. Salted with CACHE_VERSION: bump it when the SVD or the key
                    changes and every old entry is simply recomputed.
  file format       `stored_base_digest`: the record a self-contained file carries of its stored SVD base. Versioned
                    by the file format (`tlora_base.version`), never by the cache, so files users saved stay valid
                    whatever happens to the cache. A version's definition is frozen once released.
  checkpoint        `checkpoint_digest`: which weights a stored base was built from (both writers, one definition).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

# Bump when the SVD computation or the cache key changes, so old cache entries are never served.
CACHE_VERSION = 2

# File-format version -> the salt its stored-base digest uses. Version 1 was defined with the salt "v2" (it
# reused the cache key of the time); it is frozen here so that no later change of CACHE_VERSION can touch it.
FORMAT_SALTS = {1: "v2"}
FORMAT_VERSION = 1
BASE_SUFFIXES = (".base_q", ".base_p", ".base_lambda")  # what a self-contained LyCORIS file adds


def _sha(salt: str, parts: tuple[torch.Tensor | str, ...]) -> str:
    """SHA-256 over a salt, strings and tensors (dtype, shape and bytes), 40 hex digits. (SHA-256: with the CPUs'
    SHA extensions about twice as fast as BLAKE2b here.)"""
    h = hashlib.sha256()
    h.update(salt.encode())
    for p in parts:
        if isinstance(p, str):
            h.update(b"s" + p.encode())
            continue
        t = p.detach().contiguous().cpu()
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:40]


def cache_key(*parts: torch.Tensor | str) -> str:
    """Content key of tensors and strings for the SVD cache (changes with CACHE_VERSION)."""
    return _sha(f"v{CACHE_VERSION}", parts)


def stored_base_digest(tensors: Mapping[str, torch.Tensor], version: int = FORMAT_VERSION) -> str:
    """Digest of a self-contained file's stored-base tensors (names ending in BASE_SUFFIXES), in name order, as
    file-format `version` defines it. Raises KeyError for a version this code does not know."""
    salt = FORMAT_SALTS[version]
    names = sorted(k for k in tensors if k.endswith(BASE_SUFFIXES))
    return _sha(salt, tuple(part for k in names for part in (k, tensors[k])))


def weight_digest(weight: torch.Tensor) -> str:
    """Digest of one base weight's values as float32 (so fp32, fp16 and bf16 copies of the same values agree)."""
    return _sha("weight", (weight.detach().float(),))


def checkpoint_digest(weight_digests: Mapping[str, str]) -> str:
    """Which checkpoint a stored base was built from: BLAKE2b over the `weight_digest` of each module's base weight
    (the rows it patches, in the trainer's order), in module-name order."""
    text = "".join(f"{name}={weight_digests[name]};" for name in sorted(weight_digests))
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()
