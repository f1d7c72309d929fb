#!/usr/bin/env bash
# Mixtral-8x7B pretraining with FluidMoE: stock Megatron-LM pretrain_gpt.py + --use-fluid-moe.
#
# Shape and hyper-parameters of Mixtral 8x7B (as Megatron-LM/examples/mixtral, without Transformer
# Engine or apex): 32 layers, hidden 4096, FFN 14336, 32 heads / 8 query groups, 8 experts top-2,
# vocab 32000, sequence 4096, RoPE base 1e6, RMSNorm eps 1e-5, SwiGLU, no biases, untied
# embeddings, bf16, AdamW lr 1e-4 cosine to 1e-5, warmup 500, weight decay 0.1, clip 1.0.
#
# Every setting below is an environment variable with a default. One node (run it once):
#     NNODES=1 GPUS_PER_NODE=8 PP=4 EP=2 bash examples/run_mixtral_8x7b.sh
# Several nodes (run it on every node, NODE_RANK 0..NNODES-1, same MASTER_ADDR):
#     NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash examples/run_mixtral_8x7b.sh
# Real data instead of mock data: DATA_PATH="1.0 /data/mixtral_text_document" and
# TOKENIZER_MODEL=/models/mixtral/tokenizer.model. DRY_RUN=1 prints the command and exits.
#
# Memory: Mixtral 8x7B has 46.7B parameters; with bf16 weights, fp32 gradients and the
# distributed Adam state that is ~16 bytes per parameter before activations, i.e. more than
# one 8 x 80 GB node holds. The defaults (4 nodes x 8 GPUs, PP=4, EP=8) follow Megatron-LM's
# Mixtral example. For a smoke test of the flags on fewer GPUs shrink the model:
#     NUM_LAYERS=2 SEQ_LENGTH=1024 NNODES=1 GPUS_PER_NODE=2 PP=1 EP=2 GLOBAL_BATCH=8 \
#         TRAIN_ITERS=5 bash examples/run_mixtral_8x7b.sh
# FluidMoE constraints (checked when the model is built): TP=1, EP divides the 8 experts,
# CP divides the 32 heads (Ulysses all-to-all), no --overlap-moe-expert-parallel-comm.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# -- cluster ------------------------------------------------------------------------------------
NNODES=${NNODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

# -- parallelism --------------------------------------------------------------------------------
TP=${TP:-1}            # FluidMoE supports tensor-parallel size 1 only
PP=${PP:-4}
EP=${EP:-8}
CP=${CP:-1}            # Ulysses context parallelism through FluidSelfAttention
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}

# -- model (defaults: Mixtral 8x7B) -----------------------------------------------------------
NUM_LAYERS=${NUM_LAYERS:-32}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
NUM_EXPERTS=${NUM_EXPERTS:-8}

# -- training -----------------------------------------------------------------------------------
TRAIN_ITERS=${TRAIN_ITERS:-500000}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-500}
LR_DECAY_ITERS=${LR_DECAY_ITERS:-320000}
LOG_INTERVAL=${LOG_INTERVAL:-1}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-}   # empty: no --save / --load
SAVE_INTERVAL=${SAVE_INTERVAL:-10000}

# -- data ---------------------------------------------------------------------------------------
DATA_PATH=${DATA_PATH:-}               # empty: Megatron's mock data (random tokens)
TOKENIZER_TYPE=${TOKENIZER_TYPE:-Llama2Tokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
SPLIT=${SPLIT:-99990,8,2}

# -- where pretrain_gpt.py is: the submodule, else the staged copy of a GPU host ---------------
PRETRAIN=${PRETRAIN:-$ROOT/Megatron-LM/pretrain_gpt.py}
if [ ! -f "$PRETRAIN" ] && [ -f "$ROOT/.megatron/pretrain_gpt.py" ]; then
    PRETRAIN=$ROOT/.megatron/pretrain_gpt.py
fi
PYTHON=${PYTHON:-python}
if [ -x "$ROOT/.venv/bin/python" ] && [ "$PYTHON" = python ]; then
    PYTHON=$ROOT/.venv/bin/python
fi

# Only with one hardware queue does an all-to-all launched before a GEMM keep its place on the
# GPU (docs/CORE_CONCEPT.md); NVLink SHARP (NVLS) is off as on the hosts we measured.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)

MODEL_ARGS=(
    --num-layers "$NUM_LAYERS"
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --seq-length "$SEQ_LENGTH"
    --max-position-embeddings 32768
    --position-embedding-type rope
    --rotary-base 1000000
    --normalization RMSNorm
    --norm-epsilon 1e-5
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
)

MOE_ARGS=(
    --num-experts "$NUM_EXPERTS"
    --moe-router-topk 2
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall
    --use-fluid-moe
)

# No Transformer Engine, no apex: the local implementation and the unfused PyTorch paths.
IMPL_ARGS=(
    --transformer-impl local
    --no-rope-fusion
    --no-gradient-accumulation-fusion
    --no-persist-layer-norm
    --no-masked-softmax-fusion
    --no-bias-dropout-fusion
    --no-bias-swiglu-fusion
)

if [ -n "$DATA_PATH" ]; then
    DATA_ARGS=(--data-path $DATA_PATH --split "$SPLIT" --tokenizer-type "$TOKENIZER_TYPE")
    [ -n "$TOKENIZER_MODEL" ] && DATA_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")
else
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --split "$SPLIT")
fi

TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH"
    --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$TRAIN_ITERS"
    --lr "$LR"
    --min-lr "$MIN_LR"
    --lr-decay-style cosine
    --lr-warmup-iters "$LR_WARMUP_ITERS"
    --lr-decay-iters "$LR_DECAY_ITERS"
    --optimizer adam
    --adam-beta1 0.9
    --adam-beta2 0.95
    --adam-eps 1e-8
    --weight-decay 0.1
    --clip-grad 1.0
    --bf16
    --use-distributed-optimizer
    --seed 1234
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
    --context-parallel-size "$CP"
)

LOGGING_ARGS=(
    --log-interval "$LOG_INTERVAL"
    --log-throughput
    --eval-interval 1000
    --eval-iters 10
    --distributed-timeout-minutes 30
)
if [ -n "$CHECKPOINT_PATH" ]; then
    LOGGING_ARGS+=(--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL")
fi

# EXTRA_ARGS: anything else for pretrain_gpt.py, e.g. "--overlap-grad-reduce".
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

CMD=("$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" "$PRETRAIN"
     "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${IMPL_ARGS[@]}" "${DATA_ARGS[@]}"
     "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${LOGGING_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"})

if [ "${DRY_RUN:-0}" != 0 ]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
cd "$ROOT"
exec "${CMD[@]}"
