"""The test harness itself against the real server: what it posts arrives as given."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("value", [False, 0, "", True, {"a": 1}], ids=repr)
def test_post_sends_the_value_it_is_given(server, value):
    """A setting posted as false must read back false, not as an empty object (which the frontend takes as true:
    Nodes 2.0 on when asked off)."""
    server.post("/settings/TLoRA.Harness.Check", value)
    got = server.get("/settings/TLoRA.Harness.Check")
    assert got == value and type(got) is type(value), got
