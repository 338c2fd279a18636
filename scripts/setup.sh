#!/usr/bin/env bash
# One-step set-up: a virtualenv in .venv with forge (editable) and its dev/test dependencies.
# Safe to re-run; it only installs what is missing.
#
# torch: on a machine without an NVIDIA GPU we pin torch==2.13.0, which resolves to the CPU
# build where a local wheel exists (and avoids a multi-GB CUDA download); with a GPU we keep
# (or install) the default CUDA build. Either way the installed torch is then held fixed so no
# later dependency upgrades it. Override with FORGE_TORCH_SPEC="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "forge needs Python >= 3.10"'
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  default_torch="torch"
else
  default_torch="torch==2.13.0"
fi
torch_spec="${FORGE_TORCH_SPEC:-$default_torch}"
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "[setup] installing $torch_spec"
  "$PY" -m pip install -q "$torch_spec" 2>&1 | grep -v "is ignored: it is neither" || true
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -W ignore -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"

# Skip pip entirely when forge is already installed from this checkout with its extras.
if ! "$PY" -c 'import forge, moto, deepspeed, onnxruntime, onnxscript, pandera, optuna, mlflow, pytest, aiohttp_cors' >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.forge-installed" ] \
   || [ requirements/constraints.txt -nt "$VENV/.forge-installed" ]; then
  echo "[setup] installing forge and its dependencies into $VENV (a few minutes the first time)"
  "$PY" -m pip install -q -c "$constraints" -c requirements/constraints.txt \
    -e ".[dev,export,deepspeed,data,sweep,mlops,cluster]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$PY" -c 'import forge, ray, hydra, pytorch_lightning' # fail loudly if the install did not take
  touch "$VENV/.forge-installed"
fi
# Bytecode for forge itself: an editable install compiles nothing, and where
# PYTHONDONTWRITEBYTECODE is set (this project's machines, many Docker images) every Ray worker
# would compile forge's modules again before its first step (~35 ms of CPU each, issue 16).
"$PY" -m compileall -q forge recipes >/dev/null || true
echo "[setup] ready: $("$PY" -W ignore -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")')"
