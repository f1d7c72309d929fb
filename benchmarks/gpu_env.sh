# Source on a GPU host (device run): installs the carried wheels and puts the carried, patched
# Megatron tree and the overlay on the path. See tools/stage_gpu.sh.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
# The overlay's entry points (layer-spec hook, training-log hook) without building a wheel:
mkdir -p /tmp/site/fluidmoe-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: fluidmoe\nVersion: 0.1.0\n' > /tmp/site/fluidmoe-0.1.0.dist-info/METADATA
cp overlay/fluid/../pyproject.toml /tmp/pyproject.toml
python3 - <<'PY'
import tomllib
eps = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["entry-points"]
with open("/tmp/site/fluidmoe-0.1.0.dist-info/entry_points.txt", "w") as f:
    for group, items in eps.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n")
PY
export PYTHONPATH=$PWD/.megatron:$PWD/overlay:$PWD:/tmp/site
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
