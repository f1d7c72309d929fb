#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks/, as they were launched on the device host (4 GPUs):
#   bash benchmarks/run_gpu.sh layers OUT       # MoE layer benchmark (NVLink, P2P off), attention parity
#   bash benchmarks/run_gpu.sh e2e-nvlink OUT   # attention benchmark (P2P off); end to end over NVLink
#                                               # (+ checkpoint interchange)
#   bash benchmarks/run_gpu.sh e2e-p2poff OUT   # end to end with NCCL_P2P_DISABLE=1, and the CP run
#   bash benchmarks/run_gpu.sh e2e-final OUT    # the final pass: both links, checkpoints, CP (one call)
#   bash benchmarks/run_gpu.sh layers2 OUT      # MoE layers + kernel profile, MoE parity, e2e P2P off
#   bash benchmarks/run_gpu.sh compat2 OUT      # compat variants after the DDP-hook fix
#   bash benchmarks/run_gpu.sh next-a OUT       # MoE memory after scale_rows, stock resume
#   bash benchmarks/run_gpu.sh next-b OUT       # e2e NVLink, stock repeat, stock EP overlap (session 4)
#   bash benchmarks/run_gpu.sh next-c OUT       # PP=2 x EP=2 stock vs Fluid (session 4)
#   bash benchmarks/run_gpu.sh next-d OUT       # next-a + stock vs stock dist-opt loss floor (session 4)
#   bash benchmarks/run_gpu.sh s4 OUT           # after the dW hand-over fix (session 4)
#   bash benchmarks/run_gpu.sh next-e OUT       # never run as such: superseded by s5a (dedup, parity)
#   bash benchmarks/run_gpu.sh next-f OUT       # never run as such: superseded by s5b (probe)
#   bash benchmarks/run_gpu.sh s5a OUT          # probe with SM carve-outs (first, flawed timing); MoE
#                                               # layers with carve-out / dedup variants; parity
#   bash benchmarks/run_gpu.sh s5b OUT          # probe launch modes x carve-outs; MoE layers (ran at
#                                               # b74967e: its _async variants were removed since)
#   bash benchmarks/run_gpu.sh s5c OUT          # GPU timelines, Mixtral-like, P2P off chunks 1/2 and NVLink
#   bash benchmarks/run_gpu.sh s5d OUT          # pipeline-ordered chunk launches, carve-out auto; sweep
#   bash benchmarks/run_gpu.sh s5e OUT          # MoE layers with the session-5 defaults, both links; parity
#   bash benchmarks/run_gpu.sh s5f OUT          # carve-out size inside the MoE layer, P2P off
#   bash benchmarks/run_gpu.sh s6a OUT          # FLUID_GROUPED_MM=auto (per-expert path for large experts)
#   bash benchmarks/run_gpu.sh s6b OUT          # s6a's fixes; per-expert backward under (emulated) DDP
#   bash benchmarks/run_gpu.sh s6c OUT          # end to end at EP=2 (NPROC ignored: e2e.py --nproc 2)
#   bash benchmarks/run_gpu.sh s6d OUT          # e2e's MoE layer alone, loop vs grouped; e2e repeated
#   bash benchmarks/run_gpu.sh s6e OUT          # final: layers under DDP, paired on/off; e2e at EP=2
#   bash benchmarks/run_gpu.sh ep4-final OUT    # prepared: the same at EP=4 on a 4-GPU host
#   bash benchmarks/run_gpu.sh s7a OUT          # 64-expert layer: all ranks' timelines, a repeat of
#                                               # the default variant, GPU clocks (plain and DDP)
#   bash benchmarks/run_gpu.sh s7b OUT          # host time per forward stage (64-expert and e2e layers)
#   bash benchmarks/run_gpu.sh s7c OUT          # gather reorder vs split+cat; cProfile of the host
#   bash benchmarks/run_gpu.sh s7d OUT          # after the stream-lookup fix: GPU tests, paired
#                                               # layers (64-expert, e2e), stage times, cProfile
#   bash benchmarks/run_gpu.sh s7e OUT          # GPU tier; three layers under DDP with paired
#                                               # stock/Fluid, gather/cat and on/off rounds
#   bash benchmarks/run_gpu.sh s7f OUT          # session 7 final code: s6e's layers under DDP, both links
#   bash benchmarks/run_gpu.sh ep4-layers OUT   # ep4-final's layers only, for a short device budget
#   bash benchmarks/run_gpu.sh s7g OUT          # end to end at EP=2, final code, NVLink and P2P off;
#                                               # the 64-expert layer at 16384 tokens per rank
#   (s7c-s7e ran at 28ac883-59839e8, with the gather reorder and its _cat variant: both removed
#   after s7e measured the gather slower, see docs/benchmarks/README.md, Session 7)
#   bash benchmarks/run_gpu.sh compat OUT       # NVLink attention; DDP overlap, distributed optimizer,
#                                               # recompute, optimizer checkpoint resume, CP=4 x EP=4
# NPROC=2 runs the torchrun targets on a 2-GPU host (EP=2), as s5d/s5e were.
# Needs the carried .whl/ and .megatron/ (tools/stage_gpu.sh).
set -uo pipefail
what=$1; out=$2
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
mkdir -p "$out"
tr="python3 -m torch.distributed.run --standalone --nproc-per-node ${NPROC:-4}"  # NPROC=2 on a 2-GPU host
# Both MoE layer configurations under emulated DDP (--ddp-grads), NVLink then P2P off, with paired
# stock/Fluid and scheduler off/on rounds. $1: timeout per link (s); $2: the paired variant over
# P2P off (over NVLink it is the default, fluid_on_c1).
ddp_layers() {
  timeout "$1" $tr benchmarks/bench_moe.py --out "$out/moe_nvlink_ddp" --iters 20 --ddp-grads \
    --paired-rounds 3 --paired-variant fluid_on_c1 --paired-onoff > "$out/moe_nvlink_ddp.log" 2>&1
  tail -c 150 "$out/moe_nvlink_ddp.log"
  NCCL_P2P_DISABLE=1 timeout "$1" $tr benchmarks/bench_moe.py --out "$out/moe_p2poff_ddp" --iters 20 --ddp-grads \
    --paired-rounds 3 --paired-variant "$2" --paired-onoff > "$out/moe_p2poff_ddp.log" 2>&1
  tail -c 150 "$out/moe_p2poff_ddp.log"
}
case "$what" in
  layers)
    timeout 200 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" 2>&1 | tail -25
    NCCL_P2P_DISABLE=1 timeout 200 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" 2>&1 | tail -25
    timeout 120 python3 -m pytest -q -s tests/gpu/test_attention_parity.py > "$out/attn_parity.txt" 2>&1
    grep -E "PASS|FAIL|passed|failed" "$out/attn_parity.txt" | tail -20
    ;;
  e2e-nvlink)
    timeout 60 python3 -m pytest -q -s tests/gpu/test_attention_parity.py -k cp1 > "$out/attn_parity.txt" 2>&1
    grep -E "PASS|FAIL|passed|failed" "$out/attn_parity.txt" | tail -8
    NCCL_P2P_DISABLE=1 timeout 120 $tr benchmarks/bench_attention.py --out "$out/attn_p2poff" 2>&1 | tail -12
    timeout 420 python3 benchmarks/e2e.py --out "$out/e2e_nvlink" --iters 50 \
      --variants init,stock,fluid,stock_ep_overlap,stock_from_fluid,fluid_from_fluid
    ;;
  e2e-final)
    timeout 45 python3 -m pytest -q -s tests/gpu/test_attention_parity.py -k cp1 > "$out/attn_parity_cp1.txt" 2>&1
    grep -E "PASS|FAIL|passed|failed" "$out/attn_parity_cp1.txt" | tail -8
    timeout 250 python3 benchmarks/e2e.py --out "$out/e2e_nvlink" --iters 50 \
      --variants init,stock,fluid,stock_from_fluid,fluid_from_fluid
    timeout 310 python3 benchmarks/e2e.py --out "$out/e2e_p2poff" --iters 50 --p2p-disable \
      --variants init,stock,fluid,fluid_cp1_ep4_seq16k,fluid_cp2_ep2_seq16k
    ;;
  layers2)
    # Session 3: MoE layers after the min-window and inline-when-no-overlap changes (with a kernel
    # profile of chunks 1 vs 2), MoE parity unfused and fused SwiGLU, e2e over P2P off.
    timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --profile 2>&1 | grep -v Warning | tail -4
    NCCL_P2P_DISABLE=1 timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --profile 2>&1 | grep -v Warning | tail -4
    timeout 150 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -6
    timeout 240 python3 benchmarks/e2e.py --out "$out/e2e_p2poff" --iters 50 --p2p-disable \
      --variants init,stock,fluid
    ;;
  compat2)
    # After the inline-when-no-overlap policy: NVLink MoE layers again (30 timed iterations).
    timeout 120 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 30 2>&1 | grep -v Warning | tail -3
    timeout 440 python3 benchmarks/e2e.py --out "$out/e2e_compat2" --iters 20 \
      --variants init,fluid_ddp_overlap,fluid_optim_save,fluid_optim_resume,fluid_cp4_ep4_seq16k,fluid_cp1_ep4_seq16k
    ;;
  optim-plain)
    timeout 240 python3 benchmarks/e2e.py --out "$out/e2e_optim" --iters 20 \
      --variants fluid_optim_save_plain,fluid_optim_resume_plain
    ;;
  next-a)
    # Prepared for the next session (not yet run): MoE memory after moe/scale_rows.py (both links)
    # and stock's own optimizer-checkpoint resume (the iteration-12 question of fluid_optim_resume_plain).
    timeout 110 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 30 --profile 2>&1 | grep -v Warning | tail -2
    NCCL_P2P_DISABLE=1 timeout 110 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 30 2>&1 | grep -v Warning | tail -2
    timeout 150 python3 benchmarks/e2e.py --out "$out/e2e_stock_optim" --iters 20 \
      --variants stock_optim_save_plain,stock_optim_resume_plain
    ;;
  next-d)
    # Session 4: next-a (MoE both links after scale_rows, kernel profiles stock and Fluid, stock
    # plain-optimizer resume) plus the loss noise floor of a numerics-preserving change in stock
    # itself: the distributed optimizer (reduce-scatter, other summation order), 50 iterations.
    bash "$0" next-a "$out"
    timeout 170 python3 benchmarks/e2e.py --out "$out/e2e_floor" --iters 50 \
      --variants init,stock,stock_ddp_overlap
    ;;
  s4)
    # Session 4, after the dW hand-over fix (AccumulateGrad adopts the dW instead of copying it):
    # MoE layers on both links (memory, NVLink gap), the P2P-off Mixtral-like layer again with
    # NCCL_MAX_CTAS=4 (does a2a/GEMM SM contention decide chunking?), and e2e over NVLink with
    # Fluid run twice (is Fluid run-to-run deterministic, as stock is?).
    timeout 110 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 30 2>&1 | grep -v Warning | tail -2
    NCCL_P2P_DISABLE=1 timeout 110 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 30 2>&1 | grep -v Warning | tail -2
    NCCL_P2P_DISABLE=1 NCCL_MAX_CTAS=4 timeout 80 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff_ctas4" \
      --configs mixtral --iters 30 2>&1 | grep -v Warning | tail -2
    timeout 250 python3 benchmarks/e2e.py --out "$out/e2e_nvlink" --iters 50 \
      --variants init,stock,fluid,fluid_repeat
    ;;
  s4-det)
    # Session 4: where Fluid's run-to-run nondeterminism comes from (s4: fluid vs fluid_repeat
    # differ as much as fluid vs stock), and whether --deterministic-mode removes it.
    timeout 60 python3 benchmarks/determinism_probe.py --out "$out/probe" 2>&1 | tail -40
    timeout 230 python3 benchmarks/e2e.py --out "$out/e2e_det" --iters 50 \
      --variants init,fluid_det,fluid_det_repeat
    ;;
  next-e)
    # Prepared in session 4 (not yet run): the MoE layers on both links with the deduplicated
    # all-to-alls (variant fluid_on_c1_dedup) and 5 alternating stock/Fluid rounds (bench_moe
    # --paired-rounds, so host drift hits both sides of each ratio); GPU parity incl. dedup.
    timeout 200 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 --paired-rounds 5 2>&1 | grep -v Warning | tail -2
    NCCL_P2P_DISABLE=1 timeout 200 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --paired-rounds 5 2>&1 | grep -v Warning | tail -2
    timeout 150 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -6
    ;;
  next-f)
    # Prepared in session 4 (not yet run): does a GEMM slow down beside an all-to-all, and under
    # which NCCL settings? (why chunked forward pipelining loses; benchmarks/contention_probe.py)
    for cfg in "nvlink:" "p2poff:NCCL_P2P_DISABLE=1" "p2poff_ctas2:NCCL_P2P_DISABLE=1 NCCL_MAX_CTAS=2" \
               "p2poff_ctas8:NCCL_P2P_DISABLE=1 NCCL_MAX_CTAS=8" "nvlink_ctas2:NCCL_MAX_CTAS=2"; do
      tag=${cfg%%:*}; envs=${cfg#*:}
      env $envs timeout 60 $tr benchmarks/contention_probe.py --out "$out/contention" --tag "$tag" 2>&1 | grep '"tag"' | cut -c1-400
    done
    ;;
  s5a)
    # Session 5: the persistent-GEMM hypothesis. Contention probe (dense, grouped fwd and grouped
    # dW GEMMs beside an all-to-all, SM carve-outs 0-32) on both links, then the MoE layers with
    # carve-out variants (CommContext.sm_carveout) and dedup, paired rounds, and GPU parity.
    for cfg in "p2poff:NCCL_P2P_DISABLE=1" "nvlink:"; do
      tag=${cfg%%:*}; envs=${cfg#*:}
      env $envs timeout 90 $tr benchmarks/contention_probe.py --out "$out/contention" --tag "$tag" \
        --carveouts 0,8,16,24,32 2>&1 | grep '^\[probe'
    done
    NCCL_P2P_DISABLE=1 timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --extra-variants fluid_on_c1_sm16,fluid_on_c2_sm16,fluid_on_c4_sm16,fluid_on_c1_sm32,fluid_on_c2_sm32,fluid_on_c4_sm32,fluid_on_c1_dedup_sm16 \
      --paired-rounds 3 --paired-variant fluid_on_c2_sm16 2>&1 | grep -v Warning | tail -1
    timeout 120 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 \
      --extra-variants fluid_on_c2_sm16,fluid_on_c2_sm32,fluid_on_c1_dedup_sm16 \
      --paired-rounds 3 2>&1 | grep -v Warning | tail -1
    timeout 150 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -8
    ;;
  s5b)
    # Session 5, call 2: s5a's probe showed every GEMM starting only after the all-to-all
    # (hidden ~0.03, any carve-out). Which launch mode lets them run together? Then the MoE
    # layers with async-launched all-to-alls (CommContext.async_launch), paired rounds on the best.
    for cfg in "p2poff:NCCL_P2P_DISABLE=1" "nvlink:"; do
      tag=${cfg%%:*}; envs=${cfg#*:}
      env $envs timeout 100 $tr benchmarks/contention_probe.py --out "$out/contention" --tag "$tag" \
        --carveouts 0,16 --iters 10 2>&1 | grep '^\[probe'
    done
    NCCL_P2P_DISABLE=1 CUDA_DEVICE_MAX_CONNECTIONS=8 timeout 60 $tr benchmarks/contention_probe.py \
      --out "$out/contention" --tag p2poff_cdmc8 --carveouts 0 --iters 10 --modes sync,async 2>&1 | grep '^\[probe'
    NCCL_P2P_DISABLE=1 timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --extra-variants fluid_on_c1_async,fluid_on_c2_async,fluid_on_c4_async,fluid_on_c2_async_sm16,fluid_on_c4_async_sm16,fluid_on_c1_dedup_async,fluid_on_c1_loop_async \
      --paired-rounds 3 --paired-variant best 2>&1 | grep -v Warning | tail -1
    timeout 120 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 \
      --extra-variants fluid_on_c1_async,fluid_on_c2_async,fluid_on_c1_loop_async \
      --paired-rounds 3 --paired-variant best 2>&1 | grep -v Warning | tail -1
    ;;
  s5c)
    # Session 5, call 3: GPU timelines (bench_moe --trace) of the Mixtral-like layer: P2P off with
    # 1 and 2 chunks under a 16-SM carve-out (why the forward pipeline still does not pay), and
    # NVLink stock vs Fluid (where Fluid's few percent go).
    NCCL_P2P_DISABLE=1 timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --configs mixtral --extra-variants fluid_on_c1_sm16,fluid_on_c2_sm16,fluid_on_c2_sm24 \
      --trace fluid_on_c1_sm16,fluid_on_c2_sm16,stock 2>&1 | grep -v Warning | tail -1
    timeout 120 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 --configs mixtral \
      --trace fluid_on_c1,stock 2>&1 | grep -v Warning | tail -1
    ;;
  s5d)
    # Session 5, call 4: forward chunks launched in pipeline order (FluidMoELayer.forward) and
    # the carve-out default ("auto" = 16 SMs over a slow link); carve-out sweep of the probe.
    NCCL_P2P_DISABLE=1 timeout 80 $tr benchmarks/contention_probe.py --out "$out/contention" --tag p2poff \
      --carveouts 0,4,8,12,16,24 --iters 10 --modes sync 2>&1 | grep '^\[probe'
    NCCL_P2P_DISABLE=1 timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --extra-variants fluid_on_c1_sm0,fluid_on_c2_sm0,fluid_on_c2_sm8,fluid_on_c4_sm8 \
      --trace fluid_on_c2 --paired-rounds 3 --paired-variant best 2>&1 | grep -v Warning | tail -1
    timeout 120 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 \
      --paired-rounds 3 --paired-variant best 2>&1 | grep -v Warning | tail -1
    ;;
  s5e)
    # Session 5, final: the MoE layers with the session-5 defaults (carve-out auto, dedup auto,
    # pipeline-ordered chunk launches), both links, paired rounds on the best; GPU parity.
    NCCL_P2P_DISABLE=1 timeout 170 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --extra-variants fluid_on_c1_sm0 --trace fluid_on_c1 --paired-rounds 3 --paired-variant best \
      > "$out/moe_p2poff.log" 2>&1; tail -c 300 "$out/moe_p2poff.log"
    timeout 170 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 \
      --paired-rounds 3 --paired-variant best > "$out/moe_nvlink.log" 2>&1; tail -c 300 "$out/moe_nvlink.log"
    timeout 150 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -8
    ;;
  s5f)
    # Session 5, last: the carve-out size inside the MoE layer (P2P off): 0 / 4 / 8 / 16 (auto) / 24.
    NCCL_P2P_DISABLE=1 timeout 200 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --extra-variants fluid_on_c1_sm0,fluid_on_c1_sm4,fluid_on_c1_sm8,fluid_on_c1_sm24 \
      > "$out/moe_p2poff.log" 2>&1; tail -c 200 "$out/moe_p2poff.log"
    ;;
  s6a)
    # Session 6, call 1: FLUID_GROUPED_MM=auto (large experts: one cuBLAS GEMM per expert, and with
    # dW inline the per-expert backward of fluid.moe.expert_loop), both links; GPU parity.
    timeout 170 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 --trace stock,fluid_on_c1 \
      --paired-rounds 3 --paired-variant fluid_on_c1 > "$out/moe_nvlink.log" 2>&1; tail -c 300 "$out/moe_nvlink.log"
    NCCL_P2P_DISABLE=1 timeout 170 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff" --iters 20 \
      --paired-rounds 3 --paired-variant best > "$out/moe_p2poff.log" 2>&1; tail -c 300 "$out/moe_p2poff.log"
    timeout 180 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -8
    ;;
  s6b)
    # Session 6, call 2: s6a's fixes (no zero fill of the loop dW, no scale_rows copy) and the
    # per-expert backward only under DDP main_grad: NVLink with and without --ddp-grads, P2P off
    # with --ddp-grads; GPU parity (now with the emulated-DDP check).
    timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink_ddp" --iters 20 --ddp-grads \
      --trace stock,fluid_on_c1 --paired-rounds 3 --paired-variant fluid_on_c1 \
      > "$out/moe_nvlink_ddp.log" 2>&1; tail -c 200 "$out/moe_nvlink_ddp.log"
    timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink" --iters 20 \
      --paired-rounds 3 --paired-variant fluid_on_c1 > "$out/moe_nvlink.log" 2>&1; tail -c 200 "$out/moe_nvlink.log"
    NCCL_P2P_DISABLE=1 timeout 150 $tr benchmarks/bench_moe.py --out "$out/moe_p2poff_ddp" --iters 20 --ddp-grads \
      --paired-rounds 3 --paired-variant best > "$out/moe_p2poff_ddp.log" 2>&1; tail -c 200 "$out/moe_p2poff_ddp.log"
    timeout 120 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -8
    ;;
  s6c)
    # Session 6, call 3 (2-GPU host): end to end at EP=2 over NVLink, where FLUID_GROUPED_MM=auto
    # takes the per-expert backward under real Megatron DDP; stock and Fluid from one checkpoint.
    timeout 560 python3 benchmarks/e2e.py --out "$out/e2e_ep2" --iters 40 --nproc 2 \
      --variants init_ep2,stock_ep2,fluid_ep2,fluid_ep2_grouped,stock_ep2_ddp_overlap,fluid_ep2_ddp_overlap \
      2>&1 | tail -40
    ;;
  s6d)
    # Session 6, call 4 (2-GPU host): why e2e at EP=2 was slower with per-expert GEMMs (s6c: 508 vs
    # 411 ms): the e2e model's MoE layer alone, loop vs grouped, under emulated DDP; e2e repeated.
    timeout 120 $tr benchmarks/bench_moe.py --out "$out/moe_e2e_nvlink_ddp" --configs e2e --iters 20 --ddp-grads \
      --trace fluid_on_c1,fluid_on_c1_grouped > "$out/moe_e2e_nvlink_ddp.log" 2>&1; tail -c 200 "$out/moe_e2e_nvlink_ddp.log"
    timeout 200 python3 benchmarks/e2e.py --out "$out/e2e_ep2" --iters 40 --nproc 2 \
      --variants init_ep2,fluid_ep2_grouped,fluid_ep2 2>&1 | grep rc=
    ;;
  s6e)
    # Session 6, last call (2-GPU host): final code (LOOP_MIN_EXPERT_GFLOP 400), MoE layers under
    # emulated DDP on both links with paired stock/Fluid and scheduler off/on rounds; e2e at EP=2.
    ddp_layers 140 fluid_on_c1
    timeout 200 python3 benchmarks/e2e.py --out "$out/e2e_ep2" --iters 40 --nproc 2 \
      --variants init_ep2,stock_ep2,fluid_ep2 2>&1 | grep rc=
    ;;
  ep4-final)
    # Prepared for the next 4-GPU host (not yet run): session 6's final code at EP=4, as issue 4
    # asks: both links under DDP with paired stock/Fluid and scheduler off/on rounds, plain NVLink,
    # GPU parity, and end to end at EP=4 (the e2e model's layer stays grouped under auto).
    ddp_layers 150 best
    timeout 120 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -4
    # Three e2e variants take about 180 s (s7g at EP=2: 59 + 67 + 59 s); the layers about 200 s.
    timeout 220 python3 benchmarks/e2e.py --out "$out/e2e" --iters 40 --variants init,stock,fluid 2>&1 | grep rc=
    ;;
  s7a)
    # Session 7: why the 64-expert layer under --ddp-grads measured 7.4-7.6 ms with
    # FLUID_GROUPED_MM=1 and 8.8-9.2 ms with auto (same code path): every rank's timeline of stock,
    # the default and the forced-grouped variant, the default repeated last, SM clocks meanwhile.
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu --format=csv \
      -lms 200 > "$out/gpu_clocks.csv" 2>&1 &
    smi=$!
    for mode in plain ddp; do
      flag=""; [ "$mode" = ddp ] && flag=--ddp-grads
      timeout 150 $tr benchmarks/bench_moe.py --out "$out/fine_$mode" --configs fine --iters 20 $flag \
        --trace stock,fluid_on_c1,fluid_on_c1_grouped --extra-variants "fluid_on_c1#2" \
        > "$out/fine_$mode.log" 2>&1
      tail -c 200 "$out/fine_$mode.log"
      python3 benchmarks/timeline_summary.py "$out/fine_$mode/bench_moe.json" --gaps 3 | grep -v "    gap"
    done
    kill $smi
    ;;
  s7b)
    # Session 7: the 64-expert layer is host-bound (s7a: the compute stream idles 40-60% of the
    # span). Host time per forward stage, unprofiled and in the timeline, for it and the e2e layer.
    timeout 150 $tr benchmarks/bench_moe.py --out "$out/stages" --configs fine,e2e --iters 20 \
      --stage-times fluid_on_c1,fluid_on_c1_dedup --trace fluid_on_c1 > "$out/stages.log" 2>&1
    tail -c 200 "$out/stages.log"
    python3 benchmarks/timeline_summary.py "$out/stages/bench_moe.json" --gaps 4
    python3 -c "import json; r=json.load(open('$out/stages/bench_moe.json'))['results']
for c in r:
    for v, x in r[c]['variants'].items():
        if 'stage_times_us' in x: print(c, v, round(x['fwd_ms'], 2), round(x['fwdbwd_ms'], 2), x['stage_times_us'])"
    ;;
  s7c)
    # Session 7: the dispatcher's reorder as one gather (default) vs the split+cat reference
    # (_cat), same run: stage times of both, a cProfile of the host for the default.
    timeout 170 $tr benchmarks/bench_moe.py --out "$out/reorder" --configs fine,e2e --iters 20 \
      --extra-variants fluid_on_c1_cat --stage-times fluid_on_c1,fluid_on_c1_cat \
      --host-profile fluid_on_c1 > "$out/reorder.log" 2>&1
    tail -c 200 "$out/reorder.log"
    python3 -c "import json; r=json.load(open('$out/reorder/bench_moe.json'))['results']
for c in r:
    for v, x in r[c]['variants'].items():
        print(c, v, round(x['fwd_ms'], 2), round(x['fwdbwd_ms'], 2), x.get('stage_times_us', ''))
    print(r[c]['variants']['fluid_on_c1']['host_profile'][:6000])"
    ;;
  s7d)
    # Session 7: CommContext without device-less stream lookups. The GPU tier first (MoE parity,
    # scheduler, attention: they run the changed CUDA launch path), then both host-bound layers
    # with paired stock/Fluid rounds, the _cat reference, stage times and a cProfile.
    timeout 200 python3 -m pytest -q -s tests/gpu > "$out/gpu_tests.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/gpu_tests.txt" | tail -6
    timeout 200 $tr benchmarks/bench_moe.py --out "$out/host" --configs fine,e2e --iters 20 \
      --extra-variants fluid_on_c1_cat --stage-times fluid_on_c1,fluid_on_c1_cat \
      --host-profile fluid_on_c1 --paired-rounds 3 > "$out/host.log" 2>&1
    tail -c 200 "$out/host.log"
    python3 -c "import json; r=json.load(open('$out/host/bench_moe.json'))['results']
for c in r:
    for v, x in r[c]['variants'].items():
        print(c, v, round(x['fwd_ms'], 2), round(x['fwdbwd_ms'], 2), x.get('stage_times_us', ''))
    p = r[c]['paired']; print(c, 'paired', p['speedup_median'], p['speedup_min'], p['speedup_max'])
    print(r[c]['variants']['fluid_on_c1']['host_profile'][:3000])"
    ;;
  s7e)
    # Session 7, final code on a 2-GPU host: the GPU tier, then the three layers under emulated
    # DDP (NVLink) with paired stock/Fluid, index/cat reorder and scheduler on/off rounds.
    timeout 200 python3 -m pytest -q -s tests/gpu > "$out/gpu_tests.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/gpu_tests.txt" | tail -6
    timeout 330 $tr benchmarks/bench_moe.py --out "$out/moe_nvlink_ddp" --configs fine,e2e,mixtral \
      --iters 20 --ddp-grads --extra-variants fluid_on_c1_cat --stage-times fluid_on_c1,fluid_on_c1_cat \
      --paired-rounds 3 --paired-ab fluid_on_c1_cat,fluid_on_c1 --paired-onoff > "$out/moe_nvlink_ddp.log" 2>&1
    tail -c 200 "$out/moe_nvlink_ddp.log"
    python3 -c "import json; r=json.load(open('$out/moe_nvlink_ddp/bench_moe.json'))['results']
for c in r:
    for k in ('paired', 'paired_ab', 'paired_onoff'):
        p = r[c][k]; print(c, k, {a: round(b, 3) for a, b in p.items() if a.endswith(('median', 'min', 'max'))})"
    ;;
  s7f)
    # Session 7 final code (stream-lookup fix; split+cat reorder as in session 6): the s6e layer
    # runs again, both links under emulated DDP, paired stock/Fluid and scheduler on/off rounds.
    ddp_layers 150 fluid_on_c1
    ;;
  s7g)
    # Session 7, last call: the whole model at EP=2 with the final code, from one initial
    # checkpoint, over NVLink and over P2P off (the multi-node stand-in; not run at EP=2 before).
    # (As run, both had timeout 200: too short for three variants, see raw/s7g/COMMAND.txt.)
    timeout 240 python3 benchmarks/e2e.py --out "$out/e2e_ep2" --iters 40 --nproc 2 \
      --variants init_ep2,stock_ep2,fluid_ep2 2>&1 | grep rc=
    timeout 200 python3 benchmarks/e2e.py --out "$out/e2e_ep2" --iters 40 --nproc 2 --p2p-disable \
      --variants stock_ep2,fluid_ep2 2>&1 | grep rc=
    # The host-bound 64-expert layer at 4x the tokens per rank: how the ratio and the host share move.
    timeout 150 $tr benchmarks/bench_moe.py --out "$out/fine_16k" --configs fine --tokens 16384 \
      --iters 10 --ddp-grads --paired-rounds 3 --stage-times fluid_on_c1 > "$out/fine_16k.log" 2>&1
    tail -c 150 "$out/fine_16k.log"
    ;;
  ep4-layers)
    # The layer part of ep4-final (both links under DDP, paired and on/off rounds), then MoE parity,
    # for a session with little device time left.
    ddp_layers 150 best
    timeout 100 python3 -m pytest -q -s tests/gpu/test_moe_parity.py > "$out/moe_parity.txt" 2>&1
    grep -E "\] (PASS|FAIL) \(|passed|failed" "$out/moe_parity.txt" | tail -4
    ;;
  next-b)
    # Prepared for the next session (not yet run): e2e over NVLink with the inline rule, the
    # stock-vs-stock loss noise floor, and stock's EP overlap from the same initial checkpoint.
    timeout 330 python3 benchmarks/e2e.py --out "$out/e2e_nvlink" --iters 50 \
      --variants init,stock,fluid,stock_repeat,stock_ep_overlap
    ;;
  next-c)
    # Prepared (not yet run): pipeline parallelism PP=2 x EP=2, stock vs Fluid from the shared checkpoint.
    timeout 250 python3 benchmarks/e2e.py --out "$out/e2e_pp" --iters 30 \
      --variants init,stock_pp2_ep2,fluid_pp2_ep2
    ;;
  compat)
    # Training-loop compatibility (issue 7) and the NVLink attention benchmark (issue 5).
    timeout 120 $tr benchmarks/bench_attention.py --out "$out/attn_nvlink" --skip-cp1 2>&1 | tail -12
    timeout 440 python3 benchmarks/e2e.py --out "$out/e2e_compat" --iters 20 \
      --variants init,stock,stock_ddp_overlap,fluid_ddp_overlap,fluid_recompute_selective,fluid_recompute_full,fluid_optim_save,fluid_optim_resume,fluid_cp1_ep4_seq16k,fluid_cp4_ep4_seq16k
    ;;
  e2e-p2poff)
    timeout 560 python3 benchmarks/e2e.py --out "$out/e2e_p2poff" --iters 50 --p2p-disable \
      --variants init,stock,fluid,fluid_cp1_ep4_seq16k,fluid_cp2_ep2_seq16k
    ;;
esac
