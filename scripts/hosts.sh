#!/usr/bin/env bash
# Prints the ComfyUI hosts the tests run on, one path per line: COMFYUI_PATH alone when it is set, else the pinned
# 0.3.75 and the newest (0.33.0) that scripts/setup_host.sh installs (only the pinned one with TLORA_HOSTS=one).
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${COMFYUI_PATH:-}" ]; then
  echo "$COMFYUI_PATH"
else
  echo "$root/.host/ComfyUI"
  [ "${TLORA_HOSTS:-all}" = one ] || echo "$root/.host/ComfyUI-0.33.0"
fi
