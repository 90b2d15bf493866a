"""js/tlora_strength.js is a port of tlora_core.strength (the scheduled LoRA's curve): both on one table."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tlora_core.strength import SHAPES, StrengthCurve, parse_keyframes, strength_at

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
URL = (ROOT / "js" / "tlora_strength.js").as_uri()

CURVES = [(s, e, a, b, shape, kf) for (s, e) in ((0.0, 1.0), (0.5, 1.0), (0.2, 0.7), (0.4, 0.4))
          for (a, b) in ((1.0, 1.0), (0.0, 1.0), (1.2, -0.3)) for shape in SHAPES for kf in ("",)]
CURVES += [(0.0, 1.0, 1.0, 1.0, "linear", kf) for kf in ("0:0, 0.5:1, 1:0.6", "0.3:2", ".1:-1; 0.9:1e-1\n1:0")]


def _js(script: str):
    res = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_js_curve_matches_python_at_every_percent():
    assert NODE is not None, "node (Node.js) is not installed: install it (Debian: apt-get install nodejs)"
    js = _js(f"""
import {{ strengthCurve }} from {json.dumps(URL)};
const cases = {json.dumps(CURVES)};
console.log(JSON.stringify(cases.map(([s, e, a, b, shape, kf]) => strengthCurve(
  {{ start: s, end: e, strengthStart: a, strengthEnd: b, shape, keyframesText: kf }}, 100).values)));
""")
    for (s, e, a, b, shape, kf), values in zip(CURVES, js, strict=True):
        c = StrengthCurve(s, e, a, b, shape, parse_keyframes(kf))
        py = [strength_at(c, i / 100) for i in range(101)]
        assert values == pytest.approx(py, abs=1e-12), (s, e, a, b, shape, kf)


BAD = [(0.6, 0.4, "", "is before"), (-0.1, 1.0, "", "0..1"), (0.0, 1.2, "", "0..1"),
       (0.0, 1.0, "0.5 1", "not percent:strength"), (0.0, 1.0, "0:1, 1.5:0", "outside 0..1"),
       (0.0, 1.0, "0.5:1, 0.5:0", "must increase"), (0.0, 1.0, "a:b", "not percent:strength")]


@pytest.mark.parametrize("start, end, kf, says", BAD)
def test_bad_schedules_are_refused_by_both_with_the_same_cause(start, end, kf, says):
    js = _js(f"""
import {{ strengthCurve }} from {json.dumps(URL)};
console.log(JSON.stringify(strengthCurve({{ start: {start}, end: {end}, strengthStart: 1, strengthEnd: 1,
  shape: "linear", keyframesText: {json.dumps(kf)} }})));
""")
    assert says in js["error"], js
    with pytest.raises(ValueError, match=says):
        StrengthCurve(start, end, 1.0, 1.0, "linear", parse_keyframes(kf))
