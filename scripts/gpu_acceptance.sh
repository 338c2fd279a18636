#!/usr/bin/env bash
# forge's GPU acceptance run, as one command for a one-GPU H100/H200 machine with no network
# (../shared/gpu/README.md): the strategies benchmark, the GPU tests and the GPT-2 experiment.
#
#   bash scripts/gpu_bundle.sh                # here, once: .gpu-bundle/ (Ray, DeepSpeed, ...)
#   bash scripts/gpu_acceptance.sh            # there, from the repo root, bundle carried along
#
# Every stage has its own time limit, so one that hangs cannot take the others' time, and
# every stage's log is written under $OUT (or /tmp/forge-gpu) as it runs. Stages:
#   bench   scripts/bench/strategies_gpu.py: bare loop (in this process and in a Ray worker) vs
#           forge DDP / ZeRO-2 / ZeRO-3, batch 16 (T=1024, bf16, compiled), then ZeRO-3 without
#           compile (is compile what makes ZeRO-3 8x slower than DDP?); every side profiled
#           over steps 16-19 (inside the warm-up): tables, summaries and Chrome traces in
#           $OUT/profiles.tgz. About 5-6 minutes on an H200. (Batch 32 gave bare the same
#           tokens/s as 16 on the H200: --extra-batch-size 32 to measure it again.)
#   pytest  pytest -m gpu tests/gpu, 6 at a time (each xdist worker starts its own Ray):
#           Lightning FSDP/DeepSpeed train and resume, bf16 everywhere, fp16 with loss scaling
#           on DDP, FSDP and ZeRO-2. About 2-3 minutes.
#   cli     python -m forge experiment=tinylm_gpt2_gpu trainer.max_steps=50 (end to end), ~1 min.
# One device call runs at most 10 minutes: run the bench in one, the rest in a second, e.g.
#   STAGES=bench bash scripts/gpu_acceptance.sh
#   STAGES="pytest cli" bash scripts/gpu_acceptance.sh
# or a shorter run for a session with little device time left:
#   STAGES="bench pytest" BENCH_ARGS="--only bare ddp --steps 40" \
#     PYTEST_ARGS="tests/gpu/test_strategies_gpu.py::test_fp16_with_loss_scaling -n 3" \
#     BENCH_S=120 PYTEST_S=120 bash scripts/gpu_acceptance.sh
# The machine: one or more NVIDIA GPUs with CUDA, Python 3.12 on x86-64 with torch (2.11 was
# used), Lightning and onnxruntime installed; copy the checkout and its .gpu-bundle/ (which git
# ignores) there together. Exits non-zero if a stage failed (the summary says which); the
# benchmark's targets are printed (BELOW TARGET / ok), not enforced: a benchmark reports ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .gpu-bundle/activate ]; then
  echo "No .gpu-bundle/ here: build it with scripts/gpu_bundle.sh (on a machine with network)" \
    "and copy it beside this checkout." >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "No nvidia-smi: this is the GPU acceptance run, for a machine with NVIDIA GPUs." >&2
  exit 2
fi
out=${OUT:-/tmp/forge-gpu}
mkdir -p "$out"
# shellcheck disable=SC1091
source .gpu-bundle/activate
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c 'import torch, ray, deepspeed, pytorch_lightning as pl
print("torch", torch.__version__, "cuda", torch.version.cuda, "| ray", ray.__version__,
      "| deepspeed", deepspeed.__version__, "| lightning", pl.__version__)' 2>&1 | tee -a "$out/device.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc in $((SECONDS - began)) s" | tee -a "$out/status.txt"
}
: > "$out/status.txt"
profiles=$(mktemp -d /tmp/forge-gpu-profiles.XXXX)  # one tarball back: $OUT takes 8 files

for name in ${STAGES:-bench pytest cli}; do
  case $name in
    bench)
      # shellcheck disable=SC2086
      stage bench "${BENCH_S:-420}" python3 scripts/bench/strategies_gpu.py \
        ${BENCH_ARGS:---steps 80 --variant zero3_eager=deepspeed_zero3:trainer.compile=false} \
        --profile-dir "$profiles" ;;
    pytest)
      # shellcheck disable=SC2086
      stage pytest "${PYTEST_S:-240}" python3 -m pytest -m gpu -v -o timeout=200 \
        -p no:cacheprovider ${PYTEST_ARGS:-tests/gpu -n 6} ;;
    cli)
      stage cli "${CLI_S:-150}" python3 -m forge experiment=tinylm_gpt2_gpu \
        trainer.max_steps=50 storage.uri=/tmp/forge-gpu-cli ;;
    *) echo "unknown stage $name (bench, pytest, cli)"; exit 2 ;;
  esac
done
[ -n "$(ls -A "$profiles")" ] && tar czf "$out/profiles.tgz" -C "$profiles" .
echo "summary:"
cat "$out/status.txt"
if grep -qv "rc=0 " "$out/status.txt"; then  # the Ray workers' stderr, for the failures
  find /tmp/ray -path '*/logs/*' \( -name 'worker-*.err' -o -name 'raylet.err' \) -size +0 \
    -print0 2>/dev/null | tar czf "$out/ray-errors.tgz" --null -T - 2>/dev/null
  exit 1
fi
