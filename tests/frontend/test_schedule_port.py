"""js/tlora_schedule.js is a port of tlora_core.schedule.active_rank: run both on one table of values."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tlora_core.schedule import active_rank

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

CASES = [(r, rmin, a) for r in (1, 2, 7, 16, 64, 128) for rmin in sorted({1, max(1, r // 2), r})
         for a in (0.1, 0.5, 1.0, 1.5, 2.0, 3.7)]


def test_node_is_installed():
    """The JS port is run with Node.js: missing, this tier fails here, it never skips."""
    assert NODE is not None, "node (Node.js) is not installed: install it (Debian: apt-get install nodejs)"


def test_js_port_matches_python_for_every_timestep():
    script = f"""
import {{ scheduleRanks, activeRank }} from {json.dumps((ROOT / 'js' / 'tlora_schedule.js').as_uri())};
const cases = {json.dumps(CASES)};
const out = cases.map(([r, rmin, a]) => [...scheduleRanks(r, rmin, a), activeRank(1000, r, rmin, a)]);
console.log(JSON.stringify(out));
"""
    res = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    assert len(js) == len(CASES)
    for (r, rmin, a), ranks in zip(CASES, js, strict=True):
        py = [active_rank(t, r, rmin, a) for t in range(1000)] + [active_rank(1000, r, rmin, a)]
        assert ranks == py, f"JS and Python disagree for max_rank={r} min_rank={rmin} alpha={a}"


CURVE_CASES = [(r, rmin, a, c) for r in (2, 8, 16, 64) for rmin in sorted({1, max(1, r // 2)})
               for a in (0.5, 1.0, 1.7) for c in ("power_ceil", "linear", "cosine")]


def test_js_port_matches_python_for_the_trainers_curves():
    """The curves of the trainers that feed their mask sigma (float32 arithmetic; JS emulates it with fround)."""
    script = f"""
import {{ scheduleRanks }} from {json.dumps((ROOT / 'js' / 'tlora_schedule.js').as_uri())};
const cases = {json.dumps(CURVE_CASES)};
console.log(JSON.stringify(cases.map(([r, rmin, a, c]) => scheduleRanks(r, rmin, a, c))));
"""
    res = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    bad = []
    for (r, rmin, a, c), ranks in zip(CURVE_CASES, js, strict=True):
        py = [active_rank(t, r, rmin, a, curve=c) for t in range(1000)]
        bad += [(r, rmin, a, c, t, ranks[t], py[t]) for t in range(1000) if ranks[t] != py[t]]
    assert not bad, f"{len(bad)} disagreements, e.g. {bad[:5]}"


def test_js_port_rejects_what_python_rejects():
    script = f"""
import {{ activeRank }} from {json.dumps((ROOT / 'js' / 'tlora_schedule.js').as_uri())};
const bad = [[10, 0, 1, 1], [10, 8, 9, 1], [10, 8, 1, 0], [1001, 8, 1, 1], [-1, 8, 1, 1]];
console.log(JSON.stringify(bad.map(([t, r, m, a]) => {{ try {{ activeRank(t, r, m, a); return "ok"; }}
  catch (e) {{ return e.name; }} }})));
"""
    res = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["RangeError"] * 5
    for t, r, m, a in [(10, 0, 1, 1), (10, 8, 9, 1), (10, 8, 1, 0), (1001, 8, 1, 1), (-1, 8, 1, 1)]:
        with pytest.raises(ValueError):
            active_rank(t, r, m, a)


def _recorded(min_rank=None, alpha=None, rank=8):
    rec = {"max_rank": (rank, "tensor shapes"), "min_rank": (1, "default"), "alpha": (1.0, "default")}
    if min_rank is not None:
        rec["min_rank"] = (min_rank, "sidecar lycoris_config.json")
    if alpha is not None:
        rec["alpha"] = (alpha, "metadata")
    return rec


PRECEDENCE = [  # (recorded, widgets (source, max_rank, min_rank, alpha))
    (rec, (src, mx, mn, al))
    for rec in (_recorded(), _recorded(3), _recorded(alpha=1.5), _recorded(2, 0.5), _recorded(6, 2.0, rank=64))
    for src in ("file", "sliders", "all_ranks", "bogus")
    for mx in (0, 4, 8, 100)
    for mn, al in ((1, 1.0), (4, 0.7))
]


def test_schedule_precedence_is_the_same_in_python_and_js():
    """tlora_core.recorded.resolve_schedule decides what a Load T-LoRA node runs; the node's graph uses the JS port."""
    from tlora_core.recorded import resolve_schedule

    cases = [({k: {"value": v, "source": s} for k, (v, s) in rec.items()}, w) for rec, w in PRECEDENCE]
    script = f"""
import {{ resolveSchedule }} from {json.dumps((ROOT / 'js' / 'tlora_schedule.js').as_uri())};
const cases = {json.dumps(cases)};
console.log(JSON.stringify(cases.map(([rec, [source, maxRank, minRank, alpha]]) =>
  resolveSchedule(rec, {{ source, maxRank, minRank, alpha }}))));
"""
    res = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    errors = 0
    for (rec, (src, mx, mn, al)), got in zip(PRECEDENCE, js, strict=True):
        try:
            r, m, a, _ = resolve_schedule(rec, src, mx, mn, al)
        except ValueError:
            assert "error" in got, (rec, src, mx, got)
            errors += 1
            continue
        assert got == {"maxRank": r, "minRank": m, "alpha": a}, (rec, src, mx, mn, al)
    assert 0 < errors < len(PRECEDENCE)  # both outcomes are exercised
