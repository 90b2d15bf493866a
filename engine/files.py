"""T-LoRA files in ComfyUI's folders: where they are, their identity on disk, reading them once, the SVD cache.

`read_file` keeps the last few files read in process, keyed by `FileKey` (path, size and mtime of the file and
of the sidecars that can change what it records), so re-executing a graph reads nothing again, and an edited
file or sidecar is read again. A file that changes while it is read is not cached.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import folder_paths

from ..tlora_core import TLoRA, TLoRAError, load_tlora
from ..tlora_core.describe import describe
from ..tlora_core.lru import LockedLRU
from ..tlora_core.recorded import sidecars
from ..tlora_core.svd import SVDCache

CACHE_ENV = "TLORA_CACHE_DIR"
FILE_CACHE_SIZE = 4


class FileKey(NamedTuple):
    """Identity of a T-LoRA file as read: (realpath, size, mtime_ns) of it and of each sidecar, and the vanilla
    switch and standard layout (which change how a standard layout is read)."""

    path: str
    stats: tuple[tuple[str, int, int], ...]
    assume_vanilla: bool
    standard_layout: str = "auto"


files: LockedLRU[FileKey, TLoRA] = LockedLRU(FILE_CACHE_SIZE)


def lora_path(lora_name: str) -> str:
    """Full path of a file in ComfyUI's loras folders; refuses names that escape them."""
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise TLoRAError(lora_name, "not found in ComfyUI's loras folders (models/loras)")
    # symlinked files and folders inside a loras folder are fine; '..' escapes are not
    full = os.path.normpath(os.path.abspath(path))
    roots = [os.path.normpath(os.path.abspath(p)) for p in folder_paths.get_folder_paths("loras")]
    if not any(full.startswith(r + os.sep) for r in roots):
        raise TLoRAError(lora_name, "refused: the path leads outside ComfyUI's loras folders")
    return path


def output_path(name: str, folder: str, overwrite: bool, subfolders: bool = True, where: str = "") -> str:
    """Where a node writes the file `name` (`.safetensors` added): inside `folder`, in sub-folders of it only when
    `subfolders`. Refuses empty, absolute and drive names, '..' anywhere, and any name whose normalised path leaves
    the folder; an existing file unless `overwrite`. `where` names the folder in the messages."""
    where = where or folder
    clean = name.strip()
    parts = clean.replace("\\", "/").split("/")
    bad = (not clean or os.path.isabs(clean) or clean.startswith(("/", "\\")) or (len(clean) > 1 and clean[1] == ":")
           or any(p in ("", ".", "..") for p in parts) or (not subfolders and len(parts) > 1))
    if bad:
        rule = "a relative name, sub-folders allowed" if subfolders else "a plain file name, no folders"
        raise TLoRAError(clean or "(empty)", f"the file name must be {rule}, inside {where} (no '..', not absolute)")
    root = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.join(root, clean if clean.endswith(".safetensors") else clean + ".safetensors"))
    if not path.startswith(root + os.sep):
        raise TLoRAError(clean, f"refused: the path leads outside {where}")
    if os.path.exists(path) and not overwrite:
        raise TLoRAError(path, "exists: choose another file name or switch on 'overwrite'")
    return path


def file_key(path: str, assume_vanilla: bool = False, standard_layout: str = "auto") -> FileKey:
    stats = []
    for p in (path, *sidecars(path)):
        st = os.stat(p)
        stats.append((os.path.realpath(p), st.st_size, st.st_mtime_ns))
    return FileKey(os.path.realpath(path), tuple(stats), bool(assume_vanilla), standard_layout)


def read_file(path: str, assume_vanilla: bool = False, standard_layout: str = "auto") -> TLoRA:
    """load_tlora through the in-process cache."""
    try:
        key = file_key(path, assume_vanilla, standard_layout)
    except OSError:  # gives the file's own "not found" error
        return load_tlora(path, assume_vanilla=assume_vanilla, standard_layout=standard_layout)
    hit = files.get(key)
    if hit is not None:
        return hit
    tl = load_tlora(path, assume_vanilla=assume_vanilla, standard_layout=standard_layout)
    try:
        unchanged = file_key(path, assume_vanilla, standard_layout) == key
    except OSError:
        unchanged = False
    if unchanged:  # a file rewritten while it was read is never cached under either key
        files.put(key, tl, replaces=lambda k: k.path == key.path)
    return tl


def describe_lora(lora_name: str, assume_vanilla: bool = False, standard_layout: str = "auto") -> dict:
    """What `/tlora/info` answers for a file in the loras folders: header only, nothing kept."""
    return {"lora_name": lora_name, **describe(lora_path(lora_name), assume_vanilla, standard_layout=standard_layout)}


def svd_cache() -> SVDCache:
    directory = os.environ.get(CACHE_ENV) or os.path.join(folder_paths.get_user_directory(), "tlora", "svd_cache")
    return SVDCache(directory)
