"""The README's compatibility table of the graph editor, generated from the browser tier's results (never written by
hand): tests/browser/conftest.py -> test_artifacts/comfyui-<version>/browser.json, one row per host x frontend x
Nodes 2.0 mode with the tests it ran and how long they took.

    python scripts/ui_table.py           rewrite the table in README.md from the artifacts of every host, and copy
                                         the newest frontend's node screenshots (test_screenshot_of_every_node)
                                         into docs/ui/
    python scripts/ui_table.py --check   fail if README.md's table disagrees with the artifacts (times aside)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARTIFACTS = ROOT / "test_artifacts"
MARK = "ui"
SHOTS = ROOT / "docs" / "ui"


def _key(v: str) -> list[int]:
    return [int(x) for x in v.split(".")]


def load() -> list[dict]:
    rows = []
    for f in sorted(ARTIFACTS.glob("comfyui-*/browser.json")):
        data = json.loads(f.read_text())
        rows += data["results"].values()
        print(f"{f.relative_to(ROOT)}: run {data['run']}, {len(data['results'])} combinations", file=sys.stderr)
    return sorted(rows, key=lambda r: (_key(r["host"]), _key(r["frontend"]), r["nodes2"]))


def table(rows: list[dict]) -> str:
    lines = ["| ComfyUI | frontend | Nodes 2.0 | browser tests passed | failed | time |", "|---|---|---|---|---|---|"]
    for r in rows:
        own = " (its own)" if r["pinned"] else " (`--front-end-root`)"
        lines.append(f"| {r['host']} | {r['frontend']}{own} | {'on' if r['nodes2'] else 'off'} | {r['passed']} | "
                     f"{r['failed']} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def _block(text: str) -> re.Match | None:
    return re.search(rf"(<!-- {MARK}:start -->\n)(.*?\n)?(<!-- {MARK}:end -->)", text, re.S)


def _cells(block: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")][:5] for line in block.splitlines()[2:]]


def copy_screenshots() -> int:
    """node_<id>_fe<newest>-<mode>.png of the host that served the newest frontend -> docs/ui/<id>_<mode>.png."""
    sys.path.insert(0, str(ROOT))
    from tools.harness.frontends import NEWEST, NEWEST_SERVED_BY

    shots = sorted((ARTIFACTS / f"comfyui-{NEWEST_SERVED_BY}").glob(f"node_*_fe{NEWEST}-*.png"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    for f in shots:
        node, mode = re.fullmatch(rf"node_(\w+)_fe{re.escape(NEWEST)}-(\w+)\.png", f.name).groups()
        shutil.copyfile(f, SHOTS / f"{node}_{mode}.png")
    return len(shots)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare README.md with the results")
    args = ap.parse_args(argv)
    rows = load()
    if not rows:
        print("no browser results in test_artifacts/: run the browser tier first", file=sys.stderr)
        return 1
    text = README.read_text()
    m = _block(text)
    if m is None:
        print(f"README.md has no <!-- {MARK}:start --> ... <!-- {MARK}:end --> markers", file=sys.stderr)
        return 1
    fresh = table(rows)
    if args.check:
        same = _cells(m.group(2) or "") == _cells(fresh)
        print("README's table agrees with the browser results" if same else
              "README's table differs from the browser results: run scripts/ui_table.py")
        return 0 if same else 1
    README.write_text(text[:m.start()] + m.group(1) + fresh + "\n" + m.group(3) + text[m.end():])
    print(f"README.md: {len(rows)} host x frontend x Nodes 2.0 combinations; docs/ui: {copy_screenshots()} screenshots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
