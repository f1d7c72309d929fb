#!/usr/bin/env bash
# Download the wheels a CUDA GPU host with Python 3.12 and torch already installed needs to run
# Megatron-LM's training scripts, for a host that cannot reach a package index: megatron-core at
# the version pinned in patches/upstream.lock, plus the small pure-Python packages its training
# code imports (docs/hardware.md). Binary wheels for CPython 3.12 on manylinux x86_64, no deps.
#
#   tools/gpu_wheelhouse.sh [--lock FILE] [--print-reqs | --dry-run] [DEST]   (DEST default: .whl)
#     --lock FILE    read the megatron-core pin from FILE (default: patches/upstream.lock)
#     --print-reqs   print the requirements, one a line, and exit
#     --dry-run      print the pip command and exit
#
# On the GPU host:  python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/*.whl
#                   export PYTHONPATH=<megatron tree>:/tmp/site  (the tree first: its patched megatron wins)
# The megatron-core wheel carries the prebuilt dataset helper
# (megatron/core/datasets/helpers_cpp.cpython-312-*.so); tools/stage_gpu.sh copies it next to
# helpers.cpp so Megatron does not compile it at start-up.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
lock="$root/patches/upstream.lock"
mode=download
dest=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --lock) lock="$2"; shift 2 ;;
    --print-reqs) mode=reqs; shift ;;
    --dry-run) mode=dry; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_wheelhouse: unknown option $1" >&2; exit 2 ;;
    *) dest="$1"; shift ;;
  esac
done

[ -f "$lock" ] || { echo "gpu_wheelhouse: no lock file $lock" >&2; exit 1; }
version=$(awk '$1 == "megatron-core" { print $2; exit }' "$lock")
[ -n "$version" ] || { echo "gpu_wheelhouse: no 'megatron-core <version>' line in $lock" >&2; exit 1; }

reqs=("megatron-core==$version" six regex pyyaml pydantic pydantic-core annotated-types typing-inspection)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  plat+=(--platform "$p")
done
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"
else py=python3; fi
cmd=("$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all:
     --python-version 3.12 --implementation cp "${plat[@]}" -d "$dest" "${reqs[@]}")

case "$mode" in
  reqs) printf '%s\n' "${reqs[@]}" ;;
  dry) printf '%q ' "${cmd[@]}"; echo ;;
  download)
    mkdir -p "$dest"
    "${cmd[@]}"
    ls -1 "$dest"
    du -sh "$dest" ;;
esac
