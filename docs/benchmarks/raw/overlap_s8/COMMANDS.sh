#!/bin/bash
source benchmarks/gpu_env.sh >/dev/null 2>&1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m benchmarks.run e2e_fine_ep2 --links p2poff_1ch,nvlink --variants fluid_off_q32,fluid_q32,fluid_off,fluid --iters 12 --out $OUT/raw --commit b6e20985b3097e4bd12ce6f0d59aeabf689930b5 --budget-s 400 --job-timeout-s 110 2>&1 | grep -E "^  e2e|ms/iter" | tail -12
LEFT=$(( 560 - ($(date +%s)-T0) ))
python3 -m benchmarks.run e2e_mixtral_ep2 --links p2poff_1ch --variants fluid_off_q32,fluid_q32 --iters 12 --out $OUT/raw --commit b6e20985b3097e4bd12ce6f0d59aeabf689930b5 --budget-s $LEFT --job-timeout-s 110 2>&1 | grep -E "^  e2e|ms/iter" | tail -5
echo "total $(( $(date +%s)-T0 ))s"
#!/bin/bash
source benchmarks/gpu_env.sh >/dev/null 2>&1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m benchmarks.run e2e_mixtral_ep2 --links nvlink --variants fluid_off_q32,fluid_q32,stock --iters 12 --out $OUT/raw --commit b6e20985b3097e4bd12ce6f0d59aeabf689930b5 --budget-s 200 --job-timeout-s 100 2>&1 | grep -E "^  e2e" | tail -5
python3 -m benchmarks.run e2e_mixtral_ep2 --links p2poff_1ch --variants stock --iters 12 --out $OUT/raw --commit b6e20985b3097e4bd12ce6f0d59aeabf689930b5 --budget-s 100 --job-timeout-s 100 2>&1 | grep -E "^  e2e" | tail -3
echo "e2e done $(( $(date +%s)-T0 ))s"
LEFT=$(( 555 - ($(date +%s)-T0) ))
timeout $LEFT python3 -m benchmarks.probes.breakdown --recipes e2e_mixtral_1gpu,e2e_fine_1gpu --variants stock,fluid --out $OUT/breakdown --budget-s $(( LEFT - 20 )) --commit b6e20985b3097e4bd12ce6f0d59aeabf689930b5 2>&1 | tail -30
echo "total $(( $(date +%s)-T0 ))s"
#!/bin/bash
source benchmarks/gpu_env.sh >/dev/null 2>&1
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m benchmarks.run moe_fine64_ep2 moe_mixtral_ep2 --links nvlink,p2poff_1ch --rounds 3 --out /tmp/raw --commit b6e20985b3097e4bd12ce6f0d59aeabf689930b5 --budget-s 230 --job-timeout-s 100 2>&1 | grep -E "^  moe|speedup|error|Error" | tail -12
mkdir -p $OUT/raw; cp /tmp/raw/*.json $OUT/raw/; tar -czf $OUT/logs.tgz -C /tmp/raw logs
echo "total $(( $(date +%s)-T0 ))s"
