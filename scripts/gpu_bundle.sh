#!/usr/bin/env bash
# Builds .gpu-bundle/ for scripts/gpu_acceptance.sh: the wheels an offline GPU machine (Python
# 3.12, x86-64, manylinux_2_28) lacks, at the versions of this checkout's .venv. It runs
# ../shared/gpu/make-bundle (Ray, DeepSpeed, Hydra, s3fs, moto, ...; a tool of this workplace,
# beside the repository, not in it), then adds what forge needs that neither the GPU image nor
# that tool's list has. Run it with network, after scripts/setup.sh:  bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "No .venv here: run scripts/setup.sh first (the bundle takes its versions from it)." >&2
  exit 2
fi
if [ ! -x ../shared/gpu/make-bundle ]; then
  echo "No ../shared/gpu/make-bundle beside this checkout: it builds the bulk of the bundle." >&2
  exit 2
fi
# shellcheck disable=SC1091
source .venv/bin/activate
../shared/gpu/make-bundle
for package in tenacity; do  # forge's own dependencies missing from the GPU image
  version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .gpu-bundle/whl "$package==$version"
done
du -sh .gpu-bundle
