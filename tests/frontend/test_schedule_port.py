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
