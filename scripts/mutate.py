"""Mutation check (`make mutate`): break the math on purpose, one place at a time, and count the mutants the tests
kill. Every mutant must be killed: a test suite that passes with a wrong rank formula, a wrong sigma -> t, wrong
fused-row offsets or no base subtraction proves nothing.

Each mutant replaces one exact snippet of the pack's source in a scratch copy of the tracked files (the checkout is
never edited; the run fails if the snippet is not found, so the list follows the code), runs the tests that should
notice there (in-process tiers on the first host, stopping at the first failure), and counts it killed only when a
test fails (pytest exit 1): a collection error or a crash is reported as such, never as a kill. Prints one line per
mutant and the totals; writes test_artifacts/mutation.json. The unmutated copy must pass every selection first.
Takes ~7 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
UNIT = ["tests/unit/test_schedule.py", "tests/unit/test_lycoris_format.py", "tests/unit/test_official_formats.py",
        "tests/unit/test_standard_layouts.py"]
FAMILIES = ["tests/comfy/test_families.py", "-k", "sd15 or flux or sd3 or hunyuan_video15"]
TIMESTEPS = ["tests/comfy/test_timesteps.py", "tests/comfy/test_families.py", "-k", "not lacks"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    # the rank formula
    Mutant("rank: round instead of int()", "tlora_core/schedule.py",
           "r = int(((max_timestep - t) / max_timestep) ** alpha * (max_rank - min_rank)) + min_rank",
           "r = round(((max_timestep - t) / max_timestep) ** alpha * (max_rank - min_rank)) + min_rank", tuple(UNIT)),
    Mutant("rank: exponent ignored", "tlora_core/schedule.py",
           "((max_timestep - t) / max_timestep) ** alpha * (max_rank - min_rank)",
           "((max_timestep - t) / max_timestep) * (max_rank - min_rank)", tuple(UNIT)),
    Mutant("rank: min_rank off by one", "tlora_core/schedule.py",
           "* (max_rank - min_rank)) + min_rank", "* (max_rank - min_rank)) + min_rank - 1", tuple(UNIT)),
    # sigma -> the trainer's t
    Mutant("sigma->t: flow scale 999", "tlora_core/schedule.py",
           "float(sigma) * MAX_TIMESTEP, f\"sigma", "float(sigma) * (MAX_TIMESTEP - 1), f\"sigma", tuple(TIMESTEPS)),
    Mutant("sigma->t: flow rounded", "tlora_core/schedule.py",
           "return int(t) if integer else t", "return round(t) if integer else t", tuple(TIMESTEPS)),
    Mutant("sigma->t: discrete models read as flow (sigma * 1000)", "engine/timesteps.py",
           "ts = model_sampling.timestep(sigma.detach()).float().reshape(-1).tolist()",
           "ts = (sigma.detach() * 1000).float().reshape(-1).tolist()", tuple(TIMESTEPS)),
    Mutant("sigma->t: EDM noise level mapped to the wrong end of the DDPM table", "engine/timesteps.py",
           "dists.abs().argmin(dim=0)", "dists.abs().argmax(dim=0)", ("tests/comfy/test_timesteps.py",)),
    # fused-weight row slices
    Mutant("slices: the slot adds into the wrong rows", "tlora_core/slot.py",
           "y2 = y2.narrow(1, *self.out_slice)", "y2 = y2.narrow(1, self.out_slice[0] // 2, self.out_slice[1])",
           tuple(FAMILIES)),
    Mutant("slices: Flux 2 q/k/v row offsets", "engine/keymaps/flux2.py",
           "put(key_map, f\"{d}.attn.{n}\", rows(f\"{c}.{s}_attn.qkv\", j * h, h))",
           "put(key_map, f\"{d}.attn.{n}\", rows(f\"{c}.{s}_attn.qkv\", (2 - j) * h, h))",
           ("tests/comfy/test_families.py", "-k", "flux2")),
    Mutant("slices: HunyuanVideo MLP rows of linear1", "engine/keymaps/hunyuan_video.py",
           "rows(f\"{c}.linear1\", 3 * h, mlp)", "rows(f\"{c}.linear1\", 2 * h, mlp)",
           ("tests/comfy/test_families.py", "-k", "hunyuan_video and not 15")),
    # the base subtraction
    Mutant("base: not subtracted", "tlora_core/adapter.py",
           "up_t = scale * torch.stack([lp.T, (lp - lp0).T], dim=1).flatten(0, 1)",
           "up_t = scale * torch.stack([lp.T, lp.T], dim=1).flatten(0, 1)", tuple(UNIT)),
    Mutant("base: SVD base from the smallest singular vectors", "tlora_core/lapack.py",
           "il, iu, zero = c_int(n - k + 1), c_int(n), c_dbl(0.0)", "il, iu, zero = c_int(1), c_int(k), c_dbl(0.0)",
           tuple(UNIT)),
    # the rest of the per-call path
    Mutant("strength ignored", "tlora_core/slot.py", "y2.addmm_(h.reshape(-1, n), up_t[:n], alpha=self.strength)",
           "y2.addmm_(h.reshape(-1, n), up_t[:n])", ("tests/comfy/test_conformance.py",)),
    Mutant("rank of the call ignored (all ranks)", "tlora_core/slot.py",
           "r = self.rank if act.rank is None else min(act.rank, self.rank)", "r = self.rank", tuple(FAMILIES)),
    Mutant("row reorder (swap_scale_shift) ignored", "engine/bases.py",
           "a.with_rows(t.reorder) if t.reorder is not None else a", "a",
           ("tests/comfy/test_families.py", "-k", "sd3 or hunyuan")),
)


def scratch_copy() -> Path:
    """The tracked files in a temporary folder, with the checkout's environment (.venv, .host, .cache) linked in."""
    work = Path(tempfile.mkdtemp(prefix="tlora_mutate_"))  # a valid package name: the pack's root is a package
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel)
    for env in (".venv", ".host", ".cache"):
        if (ROOT / env).exists():
            (work / env).symlink_to(ROOT / env)
    return work


def run(m: Mutant, work: Path) -> tuple[str, float]:
    """'killed' (a test failed), 'SURVIVED' (all passed) or 'ERROR <code>' (collection error, crash, no tests)."""
    path = work / m.path
    source = path.read_text()
    if source.count(m.old) != 1:
        raise SystemExit(f"mutant '{m.name}': snippet not found exactly once in {m.path}; update scripts/mutate.py")
    t0 = time.perf_counter()
    path.write_text(source.replace(m.old, m.new))
    try:
        res = subprocess.run([PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests], cwd=work,
                             capture_output=True, text=True, env={**os.environ, "TLORA_TINY_DIR": str(ROOT / ".cache" /
                                                                                                   "tiny")})
    finally:
        path.write_text(source)
    summary = (res.stdout.strip().splitlines() or [""])[-1]
    # a kill is a test that failed; an error (collection, fixture) or a crash is not one
    failed = res.returncode == 1 and " failed" in summary and " error" not in summary
    outcome = "SURVIVED" if res.returncode == 0 else "killed" if failed else f"ERROR {res.returncode}"
    if outcome.startswith("ERROR"):
        print(res.stdout[-2000:] + res.stderr[-2000:], file=sys.stderr)
    return outcome, time.perf_counter() - t0


def main() -> int:
    results = []
    work = scratch_copy()
    try:
        # the unmutated copy must pass every selection, or a "kill" could be the copy's own failure
        for tests in sorted({m.tests for m in MUTANTS}):
            res = subprocess.run([PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=work,
                                 capture_output=True, text=True,
                                 env={**os.environ, "TLORA_TINY_DIR": str(ROOT / ".cache" / "tiny")})
            if res.returncode != 0:
                print(res.stdout[-3000:] + res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"the unmutated copy fails {' '.join(tests)}: fix that first")
        for m in MUTANTS:
            outcome, secs = run(m, work)
            results.append({"mutant": m.name, "file": m.path, "outcome": outcome, "killed": outcome == "killed",
                            "seconds": round(secs, 1)})
            print(f"{outcome:>8}  {secs:6.1f} s  {m.name}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    killed = sum(r["killed"] for r in results)
    print(f"{killed} of {len(results)} mutants killed")
    (ROOT / "test_artifacts").mkdir(exist_ok=True)
    (ROOT / "test_artifacts" / "mutation.json").write_text(json.dumps(results, indent=1))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
