"""README tables generated from the tests' results (never written by hand):

  families  tests/comfy/test_families.py -> test_artifacts/comfyui-<version>/families.json (and, for families
            no diffusers class exists for, the writers' rows below)
  storage   tests/comfy/test_storage.py  -> test_artifacts/comfyui-<version>/storage.json
  writers   tests/comfy/test_writers.py  -> test_artifacts/comfyui-<version>/writers.json

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


# families with no diffusers class (no LyCORIS twin): their row comes from their trainers' formulas
FORMULA_FAMILIES = {"anima": ("Anima (vs its trainers' formulas)", "sigma (post-shift), the trainer's curve")}


def formula_rows(writers: dict) -> dict:
    """families.json-shaped rows for FORMULA_FAMILIES, from the writers' results on them (worst case of all)."""
    out: dict = {}
    for host, rows in writers.items():
        for fam, (title, rule) in FORMULA_FAMILIES.items():
            mine = [r for r in rows.values() if r["family"] == fam]
            if mine:
                out.setdefault(host, {})[fam] = {
                    "title": title, "comfy_class": mine[0]["comfy_class"], "timesteps": rule,
                    "max_effect_error": max(r["max_effect_error"] for r in mine), "max_effect_error_exact_base": None,
                    "modules": mine[0]["modules"], "fused": 0, "reordered": 0}
    return out


def _fig(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def families_table(by_host: dict) -> str:
    keys = sorted({k for rows in by_host.values() for k in rows}, key=lambda k: _first(by_host, k)["title"].lower())
    lines = ["| family | ComfyUI class | hosts | effect error vs LyCORIS | vs LyCORIS with an exact base | "
             "trainer timestep | modules (fused / reordered) |", "|---|---|---|---|---|---|---|"]
    for k in keys:
        hosts = _hosts(by_host, k)
        rows = [by_host[h][k] for h in hosts]
        r = rows[0]
        exact = [x["max_effect_error_exact_base"] for x in rows if x["max_effect_error_exact_base"] is not None]
        lines.append(f"| {r['title']} | {r['comfy_class']} | {', '.join(hosts)} | "
                     f"{max(x['max_effect_error'] for x in rows):.1e} | {_fig(max(exact) if exact else None)} | "
                     f"{r['timesteps']} | {r['modules']} ({r['fused']} / {r['reordered']}) |")
    return "\n".join(lines)


def writers_table(by_host: dict) -> str:
    keys = sorted({k for rows in by_host.values() for k in rows})
    lines = ["| file | writer | family (ComfyUI class) | hosts | modules (k×k convs) | curve | active rank at t = "
             "999 / 750 / 500 / 250 / 0 | effect error | layer error |", "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        hosts = _hosts(by_host, k)
        rows = [by_host[h][k] for h in hosts]
        r = rows[0]
        ranks = " / ".join(str(r["ranks"][t]) for t in ("999", "750", "500", "250", "0"))
        effect, layer = (max(x[f] for x in rows) for f in ("max_effect_error", "max_layer_error"))
        lines.append(f"| {k} | {r['writer']} | {r['family']} ({r['comfy_class']}) | {', '.join(hosts)} | "
                     f"{r['modules']} ({r['convs_kxk']}) | {r['curve']} | {ranks} | {effect:.1e} | {layer:.1e} |")
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
        # figures: families' effect errors; storage's rebuilt / self-contained errors; writers' effect / layer errors
        numeric = {7, 8} if name == "writers" else {3, 4}
        strip = [[c for i, c in enumerate(r) if i not in numeric] for r in (have, want)]
        if strip[0] != strip[1]:
            problems.append(f"README's {name} table differs from the test results: run scripts/families_table.py")
        for r in have + want:
            if name in ("families", "writers") and any(r[i] != "—" and float(r[i]) >= BOUND for i in numeric):
                problems.append(f"{r[0]}: conformance above {BOUND}: {r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare README.md with the results")
    args = ap.parse_args(argv)
    fams, store, writers = _load("families.json"), _load("storage.json"), _load("writers.json")
    if not fams or not store or not writers:
        print("no test results in test_artifacts/: run `make test` first", file=sys.stderr)
        return 1
    for host, rows in formula_rows(writers).items():
        fams.setdefault(host, {}).update(rows)
    tables = {"families": families_table(fams), "storage": storage_table(store), "writers": writers_table(writers)}
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
