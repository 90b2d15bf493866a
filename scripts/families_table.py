"""README tables generated from the tests' results (never written by hand):

  families  tests/comfy/test_families.py -> test_artifacts/comfyui-<version>/families.json
  storage   tests/comfy/test_storage.py  -> test_artifacts/comfyui-<version>/storage.json

    python scripts/families_table.py           rewrite the tables in README.md from the artifacts of every host
    python scripts/families_table.py --check   fail if README.md's tables disagree with the artifacts (rows, hosts,
                                               classes, conventions; every figure within its bound)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARTIFACTS = ROOT / "test_artifacts"
BOUND = 1e-4  # the families' conformance bound (relative L2 of the T-LoRA's effect, fp32)


def _load(name: str) -> dict[str, dict[str, dict]]:
    """{host version: {row key: result}} for every host that left results."""
    out = {}
    for f in sorted(ARTIFACTS.glob(f"comfyui-*/{name}")):
        data = json.loads(f.read_text())
        if "run" not in data:
            sys.exit(f"{f}: results without a run id (written by an older test suite): run the tests again")
        out[f.parent.name.removeprefix("comfyui-")] = data["results"]
        print(f"{f.relative_to(ROOT)}: run {data['run']}, {len(data['results'])} rows", file=sys.stderr)
    return out


def _hosts(by_host: dict, key: str) -> list[str]:
    return sorted((h for h, rows in by_host.items() if key in rows), key=lambda v: [int(x) for x in v.split(".")])


def families_table(by_host: dict) -> str:
    keys = sorted({k for rows in by_host.values() for k in rows}, key=lambda k: _first(by_host, k)["title"].lower())
    lines = ["| family | ComfyUI class | hosts | effect error vs LyCORIS | vs LyCORIS with an exact base | "
             "trainer timestep | modules (fused / reordered) |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        hosts = _hosts(by_host, k)
        rows = [by_host[h][k] for h in hosts]
        r = rows[0]
        lines.append(f"| {r['title']} | {r['comfy_class']} | {', '.join(hosts)} | "
                     f"{max(x['max_effect_error'] for x in rows):.1e} | "
                     f"{max(x['max_effect_error_exact_base'] for x in rows):.1e} | {r['timesteps']} | "
                     f"{r['modules']} ({r['fused']} / {r['reordered']}) |")
    return "\n".join(lines)


def storage_table(by_host: dict) -> str:
    keys = sorted({k for rows in by_host.values() for k in rows})
    lines = ["| model | checkpoint storage | loaded as | effect error, base rebuilt from it | "
             "effect error, self-contained file |", "|---|---|---|---|---|"]
    for k in keys:
        rows = [by_host[h][k] for h in _hosts(by_host, k)]
        kinds = {x["loaded_as"] for x in rows}
        loaded = kinds.pop() if len(kinds) == 1 else "; ".join(
            f"{h}: {by_host[h][k]['loaded_as']}" for h in _hosts(by_host, k))
        lines.append(f"| {rows[0]['family']} | {rows[0]['storage']} | {loaded} | "
                     f"{max(x['rebuilt'] for x in rows):.1e} | {max(x['self_contained'] for x in rows):.1e} |")
    return "\n".join(lines)


def _first(by_host: dict, key: str) -> dict:
    return next(rows[key] for rows in by_host.values() if key in rows)


def _replace(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def check(text: str, tables: dict[str, str]) -> list[str]:
    """What disagrees between README.md and fresh results: the names, classes, hosts and conventions exactly; the
    figures only against their bounds (they vary in the last digit between machines)."""
    problems = []
    for name, fresh in tables.items():
        m = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
        have = _rows(m.group(1)) if m else []
        want = _rows(fresh)
        numeric = {3, 4}  # figures: families' effect errors; storage's rebuilt / self-contained errors
        strip = [[c for i, c in enumerate(r) if i not in numeric] for r in (have, want)]
        if strip[0] != strip[1]:
            problems.append(f"README's {name} table differs from the test results: run scripts/families_table.py")
        for r in have + want:
            if name == "families" and any(float(r[i]) >= BOUND for i in numeric):
                problems.append(f"{r[0]}: conformance above {BOUND}: {r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare README.md with the results")
    args = ap.parse_args(argv)
    fams, store = _load("families.json"), _load("storage.json")
    if not fams or not store:
        print("no test results in test_artifacts/: run `make test` first", file=sys.stderr)
        return 1
    tables = {"families": families_table(fams), "storage": storage_table(store)}
    text = README.read_text()
    if args.check:
        problems = check(text, tables)
        print("\n".join(problems) or "README tables agree with the test results")
        return 1 if problems else 0
    for name, table in tables.items():
        text = _replace(text, name, table)
    README.write_text(text)
    print(f"README.md: {len(fams)} host(s) of family results, {len(store)} of storage results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
