"""Load time of a LyCORIS T-LoRA at SDXL shape (700 attention + feed-forward linears, rank 64); one JSON.

reader      tlora_core.load_tlora of the whole 700-module file
first load  tlora_core.svd.base_triplets, empty SVDCache: digest + exact top-r base (fp64 Gram eigh) + cache write
cached      the same call again (same weights, same cache): digest + cache read, no SVD
lycoris     LyCORIS' own rebuild (create_lycoris_from_weights: full SVD + gc.collect per module) on a few layers
On CPU `--layers N` runs N layers spread over the shapes and extrapolates per shape to all 700.
Usage: `python benchmarks/bench_load.py --layers 24` (CPU) or `python benchmarks/bench_load.py` (CUDA, all layers).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step import SDXL_SPEC, device_name  # noqa: E402
from tlora_core import load_tlora  # noqa: E402
from tlora_core.svd import SVDCache, base_triplets, weight_digest  # noqa: E402


def sdxl_targets() -> list[tuple[str, tuple[int, int]]]:
    """(diffusers module path, (out, in)) of every Linear inside an Attention or FeedForward of SDXL's UNet:
    what SimpleTuner's generic LyCORIS preset targets."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_SPEC.diffusers_config())
    out = []
    for name, mod in unet.named_modules():
        if type(mod).__name__ in ("Attention", "FeedForward"):
            out += [(f"{name}.{c}", (m.out_features, m.in_features)) for c, m in mod.named_modules()
                    if isinstance(m, torch.nn.Linear)]
    return out


def pick(targets, n: int):
    """About n layers, each shape's share in proportion to its count (at least one), spread over the network."""
    if n >= len(targets):
        return list(targets)
    by_shape: dict = {}
    for t in targets:
        by_shape.setdefault(t[1], []).append(t)
    out = []
    for group in by_shape.values():
        k = max(1, round(n * len(group) / len(targets)))
        out += [group[int(i * len(group) / k)] for i in range(k)]
    return out


def lycoris_file(targets, rank: int, path: Path, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in targets:
        p = "lycoris_" + name.replace(".", "_")
        sd[f"{p}.q_layer.weight"] = torch.randn(rank, i, generator=g) / i ** 0.5
        sd[f"{p}.p_layer.weight"] = torch.randn(o, rank, generator=g) / rank ** 0.5
        sd[f"{p}.lambda_layer"] = torch.rand(1, rank, generator=g) + 0.5
        sd[f"{p}.alpha"] = torch.tensor(rank / 2)
    save_file(sd, str(path))


def timed_triplets(weights, ranks, cache):
    """base_triplets with a progress callback: (result, stats, seconds per layer in order)."""
    stamps, stats = [time.perf_counter()], {}

    def progress(i, total):
        stamps.append(time.perf_counter())
        print(f"\r  SVD base {i}/{total}", end="" if i < total else "\n", file=sys.stderr, flush=True)

    out = base_triplets(weights, ranks, cache, progress, stats)
    return out, stats, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def lycoris_rebuild(name, weight, file_sd):
    """LyCORIS' own load of one module (create_lycoris_from_weights): (seconds, its base term matrix P0 L0 Q0)."""
    from lycoris import create_lycoris_from_weights

    flat = name.replace(".", "_")
    holder = torch.nn.Module()
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight.data = weight
    holder.add_module(flat, lin)
    sub = {k: v for k, v in file_sd.items() if k.startswith(f"lycoris_{flat}.")}
    t0 = time.perf_counter()
    net, _ = create_lycoris_from_weights(1.0, None, holder, weights_sd=sub)
    if weight.is_cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    (m,) = net.loras
    return sec, m.base_p.float(), m.base_lambda.float().reshape(-1), m.base_q.float()


def term_error(a, b, rank: int) -> float:
    """Max over prefixes r of |sum of the first r base terms P0 diag(L0) Q0 of a - the same of b| / max |all of b|."""
    def part(t, r):
        return (t[0][:, :r].double() * t[1][:r].double()) @ t[2][:r].double()

    worst = max(float((part(a, r) - part(b, r)).abs().max()) for r in sorted({1, rank // 2, rank}))
    return worst / float(part(b, rank).abs().max())


def alternatives(weights, rank: int) -> dict:
    """Measured options for the load path: digests hashed on a thread pool (hashlib releases the GIL), and the top-r
    eigenpairs of the fp64 Gram matrix by LAPACK's subset driver (scipy `evr`) instead of a full `torch.linalg.eigh`."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    seq = [weight_digest(w) for w in weights.values()]
    t1 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as ex:
        par = list(ex.map(weight_digest, weights.values()))
    t2 = time.perf_counter()
    out = {"digest_sequential_s": round(t1 - t0, 3), "digest_threaded_s": round(t2 - t1, 3),
           "digest_threads": os.cpu_count(), "digests_equal": seq == par, "eigh_by_shape": []}
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(torch.get_num_threads()))  # scipy's own BLAS: same threads
    try:
        import scipy.linalg
    except ImportError:
        return out
    seen = set()
    for w in weights.values():
        if tuple(w.shape) in seen or w.is_cuda:
            continue
        seen.add(tuple(w.shape))
        w64 = w.double()
        t0 = time.perf_counter()
        gram = w64.T @ w64 if w.shape[1] <= w.shape[0] else w64 @ w64.T
        t1 = time.perf_counter()
        ev, vec = torch.linalg.eigh(gram)
        t2 = time.perf_counter()
        n = gram.shape[0]
        ev2, vec2 = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - rank, n - 1], driver="evr")
        t3 = time.perf_counter()
        a = vec[:, -rank:] * ev[-rank:]
        b = torch.from_numpy(vec2) * torch.from_numpy(ev2)
        err = float((a @ vec[:, -rank:].T - b @ torch.from_numpy(vec2).T).abs().max() / ev[-1])
        out["eigh_by_shape"].append({"shape": "x".join(map(str, w.shape)), "gram_s": round(t1 - t0, 3),
                                     "torch_eigh_s": round(t2 - t1, 3), "scipy_evr_top_r_s": round(t3 - t2, 3),
                                     "top_r_projector_rel_diff": err})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, help="layers to run (default: all on CUDA, 24 on CPU)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", help="base weight dtype (default: float16 on CUDA, float32 on CPU like ComfyUI)")
    ap.add_argument("--lycoris-layers", type=int, default=3, help="layers rebuilt by LyCORIS too (one per shape)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--no-alternatives", action="store_true", help="skip the threaded digest / subset eigh timings")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import lycoris.logging  # noqa: F401  (creates its logger, which writes to stdout)

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if dev.type == "cuda" else "float32"))
    rank = args.rank

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    targets = sdxl_targets()
    counts = Counter(s for _, s in targets)
    run = pick(targets, args.layers or (len(targets) if dev.type == "cuda" else 24))
    tmp = Path(tempfile.mkdtemp(prefix="tlora_load_"))
    atexit.register(shutil.rmtree, tmp, True)
    path = tmp / "tlora_sdxl.safetensors"
    lycoris_file(targets, rank, path)
    t0 = time.perf_counter()
    tl = load_tlora(path)
    reader_s = time.perf_counter() - t0
    assert len(tl.modules) == len(targets) and tl.needs_svd_base

    g = torch.Generator(dev).manual_seed(1)
    with torch.device(dev):
        weights = {n: (torch.randn(s, generator=g) / s[1] ** 0.5).to(dtype) for n, s in run}
    ranks = dict.fromkeys(weights, rank)
    cache = SVDCache(tmp / "svd_cache")
    sync()
    first, st1, first_s = timed_triplets(weights, ranks, cache)
    cached, st2, cached_s = timed_triplets(weights, ranks, cache)
    assert st1["computed"] == len(run) and st2["cached"] == len(run)
    digest_s = []
    for w in weights.values():
        t0 = time.perf_counter()
        weight_digest(w)
        digest_s.append(time.perf_counter() - t0)

    shapes = {}
    for (_, s), a, b, d in zip(run, first_s, cached_s, digest_s, strict=True):
        e = shapes.setdefault(s, {"shape": f"{s[0]}x{s[1]}", "count": counts[s], "run": 0, "first": [], "cached": [],
                                  "digest": []})
        e["run"] += 1
        e["first"].append(a), e["cached"].append(b), e["digest"].append(d)

    ly_names = [next(n for n, s in run if s == shape) for shape, _ in counts.most_common()][: args.lycoris_layers]
    file_sd = {k: v for k, v in load_file(str(path)).items()
               if any(k.startswith("lycoris_" + n.replace(".", "_") + ".") for n in ly_names)}
    ly_rows = []
    for n in ly_names:
        sec, *terms = lycoris_rebuild(n, weights[n], file_sd)
        u, s, v = (t.float() for t in first[n])
        u64, s64, vh64 = torch.linalg.svd(weights[n].double(), full_matrices=False)  # reference: fp64 full SVD
        ref = (u64[:, :rank], s64[:rank], vh64[:rank])
        shape = tuple(weights[n].shape)
        shapes[shape]["lycoris"] = sec
        ly_rows.append({"layer": n, "shape": shapes[shape]["shape"], "lycoris_s": round(sec, 3),
                        "pack_first_s": round(first_s[list(weights).index(n)], 3),
                        "pack_vs_lycoris_terms_rel_err": term_error((u, s, v.T), terms, rank),
                        "pack_vs_fp64_svd_terms_rel_err": term_error((u, s, v.T), ref, rank),
                        "lycoris_vs_fp64_svd_terms_rel_err": term_error(terms, ref, rank)})

    per_shape, first_total, cached_total, digest_total = [], 0.0, 0.0, 0.0
    for e in shapes.values():
        f, c, d = (sum(e[k]) / len(e[k]) for k in ("first", "cached", "digest"))
        first_total, cached_total, digest_total = first_total + f * e["count"], cached_total + c * e["count"], \
            digest_total + d * e["count"]
        per_shape.append({"shape": e["shape"], "count": e["count"], "run": e["run"], "first_s_per_layer": round(f, 4),
                          "cached_s_per_layer": round(c, 4), "digest_s_per_layer": round(d, 4),
                          "lycoris_s_per_layer": round(e["lycoris"], 3) if "lycoris" in e else None})
    nbytes = sum(math.prod(s) for _, s in targets) * dtype.itemsize
    out = {
        "bench": "load", "device": device_name(dev), "torch": torch.__version__,
        "config": {"rank": rank, "weight_dtype": str(dtype).removeprefix("torch."), "layers_total": len(targets),
                   "layers_run": len(run), "threads": torch.get_num_threads(), "targeted_weight_bytes": nbytes},
        "reader_s": round(reader_s, 3), "file_bytes": path.stat().st_size,
        "measured": {"first_s": round(sum(first_s), 3), "cached_s": round(sum(cached_s), 3), "layers": len(run)},
        "all_layers" + ("" if len(run) == len(targets) else "_extrapolated"): {
            "first_load_s": round(reader_s + first_total, 2), "cached_load_s": round(reader_s + cached_total, 2),
            "cached_load_without_reader_s": round(cached_total, 2), "digest_s": round(digest_total, 2),
            "digest_gb_per_s": round(nbytes / digest_total / 1e9, 3)},
        "per_shape": sorted(per_shape, key=lambda p: -p["count"]),
        "lycoris_rebuild": ly_rows,
        "alternatives": None if args.no_alternatives else alternatives(weights, rank),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
