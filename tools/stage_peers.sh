#!/usr/bin/env bash
# Download the torchtitan peer's wheels (benchmarks/peers/torchtitan/requirements.txt, pinned there)
# into .whl-peers/ (ignored) for a GPU host with Python 3.12 on x86_64 and no network. On the host:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl-peers/*.whl
#   PYTHONPATH=/tmp/peers python3 benchmarks/peers/torchtitan/run.py ...
# Re-running removes wheels no longer pinned, so the folder holds one version of each.
set -euo pipefail
cd "$(dirname "$0")/.."
reqs=benchmarks/peers/torchtitan/requirements.txt
dest=.whl-peers
py=${PYTHON:-python3}
mkdir -p "$dest"
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$reqs" | grep -v '^$')
for pin in "${pins[@]}"; do
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$pin" 2>&1 | { grep -v '^WARNING: Location' || true; }
done
# Keep exactly the pinned versions: wheel file names normalise '-' to '_' and lower-case.
keep=$(printf '%s\n' "${pins[@]}" | sed 's/==/-/' | tr 'A-Z-' 'a-z_' | sed 's/_\([0-9][^_]*\)$/-\1/')
for whl in "$dest"/*.whl; do
  stem=$(basename "$whl" | cut -d- -f1-2 | tr 'A-Z' 'a-z')
  grep -qx "$stem" <<<"$keep" || { echo "stage_peers: removing unpinned $(basename "$whl")"; rm -f "$whl"; }
done
n=$(ls "$dest"/*.whl | wc -l)
[ "$n" -eq "${#pins[@]}" ] || { echo "stage_peers: expected ${#pins[@]} wheels, have $n" >&2; exit 1; }
du -sh "$dest"
