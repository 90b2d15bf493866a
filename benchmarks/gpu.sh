#!/usr/bin/env bash
# Every GPU benchmark in one command, each printing its JSON (with the GPU's name) into OUTDIR:
#   bash benchmarks/gpu.sh [OUTDIR]          SDXL per step (bf16, 1024², rank 64, 700 layers), Flux-scale per step
#                                            (12B-shaped, bf16, 1024², rank 64), load at SDXL shape, where the time goes
#                                            training step and peak VRAM against ComfyUI's TrainLoraNode, SDXL
#                                            and Flux.1 at 1024², bf16 and fp16, rank 64 (SDXL also 32), with
#                                            checkpointing (SDXL bf16 also without), with previews every 5 steps and
#                                            on 4 images at two sizes (buckets), Dynamic VRAM on/off end to end on ComfyUI 0.33
#                                            (T-LoRA, scheduled LoRA and hook keyframes), scheduled LoRA per step
#                                            (SDXL bf16 1024², rank 64) against the base, a static LoRA and hooks
#   bash benchmarks/gpu.sh --smoke [OUTDIR]  the same code paths on the CPU at a tiny size (~10 minutes idle;
#                                            the fp16 training rows are left out on the CPU)
# OUTDIR defaults to $OUT (the device machine's return folder) or benchmarks_out/. A failed benchmark is reported
# with its log's tail and the others still run; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
smoke=0
if [ "${1:-}" = --smoke ]; then smoke=1; shift; fi
out=${1:-${OUT:-benchmarks_out}}
mkdir -p "$out"

if [ "$smoke" = 1 ]; then
  step=(--sdxl --tiny-shape --device cpu --steps 3 --repeats 1)
  flux=(--hidden 256 --double 1 --single 2 --latent 16 --rank 8 --steps 3 --rounds 1 --device cpu --dtype bfloat16)
  load=(--layers 8 --device cpu)
  prof=(--sdxl --tiny-shape --device cpu --repeats 1 --parts rank_cost,ops,designs)
  train64=(--sdxl --tiny-shape --device cpu --off-row --previews 2 --preview-steps 2 --buckets)
  train64_fp16=(--skip)
  train32=(--sdxl --tiny-shape --device cpu --rank 4)
  trainflux=(--flux --tiny-shape --device cpu --previews 2 --preview-steps 2 --buckets)
  trainflux_fp16=(--skip)
  dyn=(--cpu)
  sched=(--tiny-shape --steps 4 --repeats 1)
else
  step=(--sdxl)
  flux=(--hidden 3072 --double 19 --single 38 --latent 128 --rank 64 --steps 25 --rounds 2 --device cuda
        --dtype bfloat16)
  load=(--device cuda)
  prof=(--sdxl --parts rank_cost,ops,designs)
  train64=(--sdxl --rank 64 --off-row --previews 5 --buckets)
  train64_fp16=(--sdxl --rank 64 --dtype float16 --previews 5)
  train32=(--sdxl --rank 32)
  trainflux=(--flux --rank 64 --previews 5 --buckets)
  trainflux_fp16=(--flux --rank 64 --dtype float16 --previews 5)
  dyn=()
  sched=(--sdxl --steps 25 --repeats 2)
fi

rc=0
run() {
  local name=$1 start
  shift
  if [ "${2:-}" = --skip ]; then echo "== $name: left out on the CPU" >&2; return; fi
  start=$(date +%s)
  echo "== $name: $*" >&2
  if "$PY" "$@" > "$out/$name.json" 2> "$out/$name.log"; then
    echo "   ok in $(( $(date +%s) - start )) s: $(head -c 400 "$out/$name.json")" >&2
  else
    echo "   FAILED after $(( $(date +%s) - start )) s (log: $out/$name.log)" >&2
    tail -n 5 "$out/$name.log" >&2
    rc=1
  fi
}
run bench_step_sdxl benchmarks/bench_step.py "${step[@]}"
run bench_step_flux benchmarks/bench_step_dit.py "${flux[@]}"
run bench_load benchmarks/bench_load.py "${load[@]}"
run profile_step benchmarks/profile_step.py "${prof[@]}"
run bench_train_r64 benchmarks/bench_train.py "${train64[@]}"
run bench_train_r64_fp16 benchmarks/bench_train.py "${train64_fp16[@]}"
run bench_train_r32 benchmarks/bench_train.py "${train32[@]}"
run bench_train_flux benchmarks/bench_train.py "${trainflux[@]}"
run bench_train_flux_fp16 benchmarks/bench_train.py "${trainflux_fp16[@]}"
run bench_dynamic benchmarks/bench_dynamic.py "${dyn[@]}"
run bench_scheduled benchmarks/bench_scheduled.py "${sched[@]}"
exit $rc
