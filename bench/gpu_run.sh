#!/usr/bin/env bash
# The GPU runs of issue 18, each one command, in sequence: `bench/gpu_run.sh STEP...` from the
# repository root of a GPU machine where `python3` has torch with CUDA and vLLM's GPU build
# (0.26+; ../shared/gpu/README.md says how to bring 0.26 to the lent H200). No venv needed: the
# workspace members' folders go on PYTHONPATH and their entry points are written beside python3.
#
# Steps (any order, any subset):
#   smoke      make smoke's loop (store, inference, rollouts, trainer on CUDA) with the 2B model
#   inference  bench/inference_bench.py: the service with refs vs vLLM in-process, cold and warm
#   openai     bench/openai_bench.py: turns 1-5, a long conversation to turn 20 (40 images) and
#              32 concurrent 5-turn rollouts (throughput), refs vs vLLM's own server (data URIs)
#   prep       bench/vllm_prep_bench.py: vLLM's own processing of a 20-turn prompt's cached images
#   trainer    bench/trainer_bench.py at the same size (Qwen2-VL-2B-sized, bf16, CUDA)
#   trainer-profile  both trainers' steps under torch.profiler (operator tables into $OUT)
#   trainer-fsdp  the same, one process vs one FSDP2 rank alternating in 4 rounds (AB BA AB BA),
#              where trainer_bench.py has --parallelism
#
# The model is a Qwen2-VL-2B-sized random-weight checkpoint (mmstore_trainer.tiny_model), built
# once under $MMSTORE_BENCH_CACHE (default /tmp/mmstore-models; MMSTORE_BENCH_MODEL=qwen2-vl-2b).
# Results: each bench rewrites its GPU section of $GPU_RESULTS (default /tmp/mmstore-gpu/RESULTS.md,
# first a copy of bench/RESULTS.md), copied to $OUT (default runs/gpu) after each step with the
# step's log and the smoke summary. Both defaults sit outside the checkout, so a second call on
# the same machine finds the model and the sections of the first. A failed step prints the end
# of its servers' logs, and the next step runs.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/runs/gpu}
mkdir -p "$OUT"
py=$(python3 -c 'import sys; print(sys.executable)')
bin=$(dirname "$py")
export PYTHONPATH=$root/clients:$root/services/mmstore:$root/services/inference:$root/trainer:$root/rollout:$root/integrations/vllm${PYTHONPATH:+:$PYTHONPATH}
# The vLLM plugin's entry point (group vllm.general_plugins), as installing mmstore-vllm declares it:
# vLLM finds plugins by distribution metadata, which a source folder on PYTHONPATH does not carry.
meta=${TMPDIR:-/tmp}/mmstore-plugin-meta
mkdir -p "$meta/mmstore_vllm-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: mmstore-vllm\nVersion: 0.1.0\n' >"$meta/mmstore_vllm-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nmmstore = mmstore_vllm:register\n' >"$meta/mmstore_vllm-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH=$PYTHONPATH:$meta
export PYTHONUNBUFFERED=1 MMSTORE_BENCH_MODEL=${MMSTORE_BENCH_MODEL:-qwen2-vl-2b} VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
export MMSTORE_BENCH_CACHE=${MMSTORE_BENCH_CACHE:-/tmp/mmstore-models}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # local checkpoints only: never wait on a hub
# the in-process engine (inference_bench) starts after CUDA is initialised: fork would break it
export VLLM_WORKER_MULTIPROC_METHOD=${VLLM_WORKER_MULTIPROC_METHOD:-spawn}
for entry in mmstore:mmstore.cli mmstore-inference:mmstore_inference.cli \
             mmstore-smoke:mmstore_rollout.cli mmstore-trainer:mmstore_trainer.cli; do
  name=${entry%%:*}
  [ -e "$bin/$name" ] || { printf '#!/bin/sh\nexec "%s" -c "from %s import app; app()" "$@"\n' "$py" "${entry#*:}" >"$bin/$name" && chmod +x "$bin/$name"; }
done
results=${GPU_RESULTS:-/tmp/mmstore-gpu/RESULTS.md}
mkdir -p "$(dirname "$results")"
[ -f "$results" ] || cp bench/RESULTS.md "$results"

t=$(date +%s)
model=$(python3 -c 'import sys; sys.path.insert(0, "bench"); from benchlib import bench_model; print(bench_model())') || exit 1
echo "model $model ready in $(($(date +%s) - t))s"

step() {  # step NAME TIMEOUT COMMAND...: run it, log it under $OUT, keep going when it fails
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name: $*"
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(($(date +%s) - t0))s" | tee -a "$OUT/$name.log"
  cp "$results" "$OUT/RESULTS.md"
  if [ "$rc" != 0 ]; then  # the servers' logs of the failed run (kept by --keep-tmp)
    for f in /tmp/mmstore-*bench*/*.log /tmp/trainer-bench-*/*.log /tmp/mmstore-gpu-smoke/services/*.log; do
      [ -f "$f" ] && { echo "--- $f"; tail -n 40 "$f"; } >>"$OUT/$name.log"
    done
  fi
}

for s in "$@"; do
  case $s in
    smoke)  # vLLM takes half the GPU: the trainer runs beside it; the run folder (with its 2B
      # checkpoint) stays out of $OUT, its summary is copied there
      smoke_dir=${TMPDIR:-/tmp}/mmstore-gpu-smoke
      MMSTORE_INFERENCE_GPU_MEMORY_UTILIZATION=0.5 MMSTORE_INFERENCE_ENFORCE_EAGER=true \
        step smoke 420 "$bin/mmstore-smoke" run --model "$model" --out "$smoke_dir"
      cp "$smoke_dir/summary.json" "$OUT/smoke-summary.json" 2>/dev/null ;;
    inference)
      step inference 420 python3 bench/inference_bench.py --output "$results" --keep-tmp --max-model-len 16384 --gap 0.5 ;;
    openai)
      step openai 570 python3 bench/openai_bench.py --output "$results" --keep-tmp --convs 1 --gap 0.5 \
        --long-turns 20 --rollouts 32 --max-model-len 40960 ;;
    prep)
      step prep 300 python3 bench/vllm_prep_bench.py --output "$results" ;;
    trainer)
      step trainer 420 python3 bench/trainer_bench.py --device cuda --config qwen2-vl-2b --output "$results" ;;
    trainer-fsdp)  # the trainer as one FSDP2 rank against one process (bench/trainer_bench.py of issue 21)
      if python3 bench/trainer_bench.py --help | grep -q -- '--parallelism'; then
        step trainer-fsdp 420 python3 bench/trainer_bench.py --device cuda --config qwen2-vl-2b \
          --parallelism off,fsdp --workers 0,2 --rounds 4 --steps 3 --output "$results"
      else
        echo "trainer-fsdp: bench/trainer_bench.py has no --parallelism here" | tee "$OUT/trainer-fsdp.log"
      fi ;;
    trainer-profile)  # where the two trainers' step time goes: torch.profiler tables, no results section
      step trainer-profile 420 python3 bench/trainer_bench.py --device cuda --config qwen2-vl-2b \
        --parallelism off,fsdp --workers 2 --steps 3 --repeats 1 --no-write --profile "$OUT/trainer-profile.txt" ;;
    *) echo "unknown step $s (smoke, inference, openai, prep, trainer, trainer-fsdp, trainer-profile)"; exit 2 ;;
  esac
done
