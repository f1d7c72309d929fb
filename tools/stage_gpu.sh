#!/usr/bin/env bash
# Stage what a GPU host needs but cannot fetch, in ignored folders that `device run` carries:
#   .whl/       megatron-core and the small pure-Python extras (tools/gpu_wheelhouse.sh)
#   .megatron/  the patched Megatron-LM tree (megatron/ and the training entry scripts), copied
#               from the submodule after `make setup`, with the wheel's prebuilt dataset helper.
# Nothing here is committed (.gitignore). On the host, `source benchmarks/gpu_env.sh` installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
test -d Megatron-LM/megatron/core || { echo "stage_gpu: needs the full tree (make setup MEGATRON_LM_URL=...)" >&2; exit 1; }
# Re-download when the megatron-core pin (patches/upstream.lock) moved since .whl was filled.
pin=$(bash tools/gpu_wheelhouse.sh --print-reqs | sed -n 's/^megatron-core==//p')
ls .whl/megatron_core-"$pin"-*.whl >/dev/null 2>&1 || { rm -rf .whl; bash tools/gpu_wheelhouse.sh .whl; }
rm -rf .megatron && mkdir -p .megatron
cp -r Megatron-LM/megatron .megatron/
cp Megatron-LM/pretrain_gpt.py Megatron-LM/gpt_builders.py Megatron-LM/model_provider.py .megatron/
find .megatron -name __pycache__ -prune -exec rm -rf {} +
so=$(ls .venv/lib/python3.12/site-packages/megatron/core/datasets/helpers_cpp*.so | head -1)
cp "$so" .megatron/megatron/core/datasets/ && touch .megatron/megatron/core/datasets/$(basename "$so")
du -sh .megatron .whl
