"""The scheduled LoRA's strength curve (tlora_core.strength): its values at known points."""

import math

import pytest

from tlora_core.strength import StrengthCurve, parse_keyframes, strength_at


@pytest.mark.parametrize("shape, mid", [("constant", 0.2), ("linear", 0.6), ("cosine", 0.6), ("smoothstep", 0.6)])
def test_shapes_run_from_strength_start_to_strength_end_inside_the_range_only(shape, mid):
    c = StrengthCurve(0.5, 1.0, 0.2, 1.0, shape)
    assert strength_at(c, 0.49) == 0.0 and strength_at(c, 0.0) == 0.0
    assert strength_at(c, 0.5) == pytest.approx(0.2)
    assert strength_at(c, 0.75) == pytest.approx(mid)
    assert strength_at(c, 1.0) == pytest.approx(0.2 if shape == "constant" else 1.0)


def test_cosine_and_smoothstep_ease_in_and_out():
    cos, smooth = StrengthCurve(0, 1, 0, 1, "cosine"), StrengthCurve(0, 1, 0, 1, "smoothstep")
    assert strength_at(cos, 0.25) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 4))
    assert strength_at(smooth, 0.25) == pytest.approx(0.25 ** 2 * 2.5)
    assert strength_at(cos, 0.1) < 0.1 and strength_at(smooth, 0.9) > 0.9


def test_keyframes_interpolate_and_hold_and_replace_the_curve():
    c = StrengthCurve(0.9, 1.0, 5.0, 5.0, "constant", parse_keyframes("0.2:0, 0.6:1\n0.8:0.5"))
    assert [strength_at(c, p) for p in (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 1.0)] == \
        pytest.approx([0.0, 0.0, 0.5, 1.0, 0.75, 0.5, 0.5])
    assert parse_keyframes("") == () and parse_keyframes(" 0:1 ; 1:0 ") == ((0.0, 1.0), (1.0, 0.0))


@pytest.mark.parametrize("kwargs, says", [({"start": 0.7, "end": 0.3}, "before start_percent"),
                                          ({"shape": "sigmoid"}, "curve must be one of"),
                                          ({"strength_end": float("nan")}, "finite")])
def test_nonsense_is_refused(kwargs, says):
    with pytest.raises(ValueError, match=says):
        StrengthCurve(**kwargs)
