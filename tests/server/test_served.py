"""What ComfyUI serves of the pack: the example workflows in its template browser and the nodes' help pages."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT

NODE_IDS = sorted(p.stem for p in (ROOT / "js" / "docs").glob("*.md"))


def test_templates_are_served(server):
    names = server.get("/workflow_templates")["ComfyUI-TLoRA"]
    assert sorted(names) == sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    for name in names:
        assert server.get(f"/api/workflow_templates/ComfyUI-TLoRA/{name}.json")["nodes"]


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_pages_are_served_where_the_frontend_looks(server, node_id):
    body = server.get(f"/extensions/ComfyUI-TLoRA/docs/{node_id}.md")
    assert body.decode().startswith("# ")
