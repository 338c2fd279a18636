#!/usr/bin/env bash
# Builds .gpu-bundle/ for scripts/gpu_acceptance.sh: ../shared/gpu/make-bundle (Ray, DeepSpeed,
# Hydra, s3fs, moto, ...), plus what forge needs that neither the GPU image nor that script's
# list has. Run here, with network, from any directory:  bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source .venv/bin/activate
../shared/gpu/make-bundle
for package in tenacity; do  # forge's own dependencies missing from the GPU image
  version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .gpu-bundle/whl "$package==$version"
done
du -sh .gpu-bundle
