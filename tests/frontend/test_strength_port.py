"""js/tlora_strength.js draws the scheduled LoRA's curve as each model call gets it (tlora_core.strength.StrengthRule,
the end point excluded) and refuses what tlora_core.strength refuses: both on one table."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tlora_core.strength import SHAPES, StrengthCurve, StrengthRule, parse_keyframes, strength_at

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
URL = (ROOT / "js" / "tlora_strength.js").as_uri()

CURVES = [(s, e, a, b, shape, kf) for (s, e) in ((0.0, 1.0), (0.5, 1.0), (0.2, 0.7), (0.4, 0.4), (1.0, 1.0))
          for (a, b) in ((1.0, 1.0), (0.0, 1.0), (1.2, -0.3)) for shape in SHAPES for kf in ("",)]
CURVES += [(0.0, 1.0, 1.0, 1.0, "linear", kf) for kf in ("0:0, 0.5:1, 1:0.6", "0.3:2", ".1:-1; 0.9:1e-1\n1:0")]


class ShiftedFlow:
    """A sampling for the rule: ComfyUI's flow percent_to_sigma at shift 3 (ModelSamplingDiscreteFlow), written
    out because this tier runs without ComfyUI. The rule's percent form does not depend on the sampling."""

    sigma_max, sigma_min = 1.0, 3 * 0.001 / (1 + 2 * 0.001)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return 3.0 * t / (1 + 2.0 * t)


def _js(script: str):
    res = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_js_curve_is_the_strength_each_call_gets_at_every_percent_and_both_ends():
    """The graph's 101 points and the values at start_percent and end_percent equal StrengthRule at the float32
    sigma of each percent: the call that reaches end_percent's sigma is already past the window."""
    assert NODE is not None, "node (Node.js) is not installed: install it (Debian: apt-get install nodejs)"
    js = _js(f"""
import {{ parseKeyframes, strengthAt, strengthCurve }} from {json.dumps(URL)};
const cases = {json.dumps(CURVES)};
console.log(JSON.stringify(cases.map(([s, e, a, b, shape, kf]) => {{
  const c = {{ start: s, end: e, strengthStart: a, strengthEnd: b, shape, keyframesText: kf }};
  return {{ grid: strengthCurve(c, 100).values,
           ends: [s, e].map((p) => strengthAt({{ ...c, keyframes: parseKeyframes(kf) }}, p)) }};
}})));
""")
    ms = ShiftedFlow()
    excluded_ends = 0
    for (s, e, a, b, shape, kf), out in zip(CURVES, js, strict=True):
        c = StrengthCurve(s, e, a, b, shape, parse_keyframes(kf))
        rule = StrengthRule(c)

        def call(p: float, rule=rule) -> float:
            return rule(float(np.float32(ms.percent_to_sigma(p))), ms)

        assert out["grid"] == pytest.approx([call(i / 100) for i in range(101)], abs=1e-6), (s, e, a, b, shape, kf)
        assert out["ends"] == pytest.approx([call(s), call(e)], abs=1e-6), (s, e, a, b, shape, kf, out["ends"])
        excluded_ends += call(e) == 0.0 != strength_at(c, e)
    assert excluded_ends >= 8  # the table holds ends the curve's own formula includes and the calls exclude


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
