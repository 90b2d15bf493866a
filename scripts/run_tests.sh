#!/usr/bin/env bash
# The README's test command (`make test`): lint, then every test tier on every ComfyUI host.
#   first host (the pinned 0.3.75, or COMFYUI_PATH): every tier
#   other hosts (0.33.0):                            every tier that runs ComfyUI (comfy, server, reliability,
#                                                    browser, models); the ComfyUI-free tiers (unit, frontend,
#                                                    registry) do not depend on the host and run once
# Extra arguments go to every pytest run (e.g. -x, -k name). A run that collects no tests fails.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=.venv/bin/python
HOST_TIERS=(tests/comfy tests/server tests/reliability tests/browser tests/models)

"$PY" -m ruff check . || exit 1
"$PY" -m mypy || exit 1  # strict on tlora_core (pyproject.toml)
mapfile -t hosts < <(bash scripts/hosts.sh)
rc=0
summary=()
for i in "${!hosts[@]}"; do
  h=${hosts[$i]}
  version=$("$PY" -c "import runpy,sys;print(runpy.run_path(sys.argv[1])['__version__'])" "$h/comfyui_version.py" 2>/dev/null \
            || echo unknown)
  if [ "$i" = 0 ]; then paths=(tests); else paths=("${HOST_TIERS[@]}"); fi
  echo "=== ComfyUI $version at $h: ${paths[*]}"
  start=$(date +%s)
  COMFYUI_PATH=$h "$PY" -m pytest "${paths[@]}" "$@"
  r=$?
  [ "$r" = 5 ] && echo "pytest collected no tests on ComfyUI $version: failing" >&2
  [ "$r" = 0 ] || rc=1
  summary+=("ComfyUI $version: exit $r in $(( $(date +%s) - start )) s")
done
printf '%s\n' "${summary[@]}"
exit $rc
