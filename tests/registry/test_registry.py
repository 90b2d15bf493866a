"""Comfy Registry readiness: metadata, `comfy node validate`, publishing filters, templates and help pages (files
only: no ComfyUI runs in this tier; tests/server/test_served.py checks ComfyUI serves them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NODE_IDS = ("TLoRALoader", "TLoRASchedulePreview", "TLoRASaveWithBase", "TLoRATrain")


def test_pyproject_has_what_the_registry_needs():
    proj, comfy = PROJECT["project"], PROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-_]{1,99}", proj["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", proj["version"])
    assert proj["description"] and proj["license"] and proj["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert (ROOT / comfy["Icon"].split("/main/", 1)[1]).is_file()  # the icon the URL points at is in the repo
    assert comfy["requires-comfyui"].startswith(">=")
    assert (ROOT / "LICENSE").is_file() and (ROOT / "CHANGELOG.md").is_file()
    assert proj["version"] in (ROOT / "CHANGELOG.md").read_text()
    assert (ROOT / ".github" / "workflows" / "publish.yml").is_file()


def test_the_supported_comfyui_and_frontend_are_declared_as_the_registry_reads_them():
    """comfy-cli's own parser (what `comfy node publish` sends): ComfyUI from the oldest host up, the frontend from
    the oldest one the browser tier runs up (an upper bound would mark the pack incompatible with every newer
    release); the frontend is metadata, never a package to install."""
    from comfy_cli.registry.config_parser import extract_node_configuration

    from tools.harness import frontends

    cfg = extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert cfg.project.supported_comfyui_version == ">=0.3.75"
    assert cfg.project.supported_comfyui_frontend_version == f">={frontends.OLDEST}"
    assert not any("comfyui-frontend-package" in d for d in cfg.project.dependencies), cfg.project.dependencies
    assert frontends.version_key(frontends.NEWEST) >= frontends.version_key(frontends.OLDEST)


def test_comfy_node_validate_passes():
    comfy = Path(sys.executable).with_name("comfy")
    res = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "All validation checks passed" in out and "Security warnings" not in out, out


def test_tests_tools_and_benchmarks_are_not_published():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".comfyignore").read_text().splitlines() if line.strip()}
    assert {"tests", "tools", "benchmarks", "scripts"} <= ignored


@pytest.mark.parametrize("wf", sorted((ROOT / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_every_example_workflow_has_a_thumbnail(wf):
    thumb = wf.with_suffix(".jpg")
    assert thumb.is_file() and thumb.stat().st_size > 5000
    from PIL import Image

    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size[0] >= 320


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_has_a_help_page(node_id):
    page = ROOT / "js" / "docs" / f"{node_id}.md"
    assert page.is_file() and page.read_text().startswith("# ")


def test_github_workflows_are_valid_and_pass_the_security_audit():
    """Both workflows (tests on pushes and pull requests, publishing on tags) against GitHub's workflow schema
    (check-jsonschema's vendored copy) and zizmor's audits (offline: pinned actions, no credential persistence,
    least permissions)."""
    bin_dir = Path(sys.executable).parent
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    assert len(workflows) == 2 and any("test.yml" in w for w in workflows), workflows
    schema = subprocess.run([str(bin_dir / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                             *workflows], capture_output=True, text=True, timeout=120)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    audit = subprocess.run([str(bin_dir / "zizmor"), "--offline", "--no-progress", *workflows], capture_output=True,
                           text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "No findings" in audit.stdout + audit.stderr, audit.stdout + audit.stderr


def test_the_published_package_holds_the_pack_and_nothing_else(tmp_path):
    """The archive `comfy node publish` uploads, made by comfy-cli's own packer (git-tracked files minus
    .comfyignore): the pack's code, frontend, workflows and docs; no tests, tools, benchmarks or scripts."""
    import zipfile

    out = tmp_path / "node.zip"
    res = subprocess.run([sys.executable, "-c", "import sys; from comfy_cli.file_utils import zip_files; "
                          "zip_files(sys.argv[1])", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    names = zipfile.ZipFile(out).namelist()
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"tests", "tools", "benchmarks", "scripts", ".ci", ".github", "Makefile"}, sorted(tops)
    for needed in ("__init__.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt", "nodes", "engine",
                   "tlora_core", "js", "example_workflows"):
        assert needed in tops, (needed, sorted(tops))
    assert "js/docs/TLoRALoader.md" in names and "nodes/loader.py" in names
