#!/usr/bin/env bash
# Pretrain Moonlight-16B-A3B with Megatron-LM's own pretrain_gpt.py and muon_ds's Muon, through the patch-free
# launcher (python -m muon_ds.megatron.launch): --optimizer muon, the model from muon_ds's Moonlight spec
# (--moonlight-spec), the architecture from configs/megatron/moonlight-16b-a3b.args.sh.
# Run it from the muon-ds repository root, on every node (torchrun starts GPUS_PER_NODE ranks per node).
# NEEDS: GPUs with CUDA, TransformerEngine (Megatron-LM's default --transformer-impl), muon-ds with its
# megatron extra, a Megatron-LM checkout at core_v0.16.1, a tokenized dataset (or MOCK_DATA=1).
#
#   one node, 8 GPUs:  MEGATRON_LM_DIR=~/Megatron-LM DATA_PATH=/data/moonlight_text_document \
#                      bash examples/megatron/pretrain_moonlight_16b.sh
#   smoke test:        MEGATRON_LM_DIR=~/Megatron-LM MOCK_DATA=1 TRAIN_ITERS=20 bash examples/megatron/pretrain_moonlight_16b.sh
#   4 nodes:           NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 ... on each node (Slurm: examples/slurm/)
#   see the command:   DRY_RUN=1 ... prints the torchrun command instead of running it
# Every setting below may come from the environment.
set -euo pipefail

# ---- paths -------------------------------------------------------------------------------------------
MEGATRON_LM_DIR=${MEGATRON_LM_DIR:-}        # Megatron-LM checkout at tag core_v0.16.1 (has pretrain_gpt.py)
DATA_PATH=${DATA_PATH:-}                    # indexed dataset prefix(es) (PREFIX.bin/.idx), or a blend "w1 P1 w2 P2"
MOCK_DATA=${MOCK_DATA:-0}                   # 1: Megatron's synthetic data instead of DATA_PATH
TOKENIZER_MODEL=${TOKENIZER_MODEL:-moonshotai/Moonlight-16B-A3B}  # HF tokenizer: hub name or local directory
MOONLIGHT_HF_CONFIG=${MOONLIGHT_HF_CONFIG:-}  # optional HF config.json: the arguments are checked against it
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/moonlight-16b-a3b}   # saved to and resumed from
PYTHON=${PYTHON:-python3}
# ---- cluster -----------------------------------------------------------------------------------------
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}       # node 0's address
MASTER_PORT=${MASTER_PORT:-29500}
# ---- parallelism (world = NNODES x GPUS_PER_NODE) ----------------------------------------------------
TP=${TP:-1}                                 # tensor parallel (sequence parallel is on when TP > 1)
PP=${PP:-1}                                 # pipeline parallel (27 layers: 1, 3, 9 or 27, else FIRST_STAGE_LAYERS)
FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS:-}  # layers of the first stage when PP does not divide 27
EP=${EP:-8}                                 # expert parallel (divides the 64 experts)
ETP=${ETP:-1}                               # expert tensor parallel
# ---- training ----------------------------------------------------------------------------------------
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}  # sequences of 8192 tokens
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-3e-4}                              # one learning rate for Muon and AdamW (Moonlight's matched-RMS update)
MIN_LR=${MIN_LR:-3e-5}
WARMUP_ITERS=${WARMUP_ITERS:-1000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXTRA_ARGS=${EXTRA_ARGS:-}                  # more Megatron-LM arguments, e.g. "--recompute-activations"
DRY_RUN=${DRY_RUN:-0}

die() { echo "pretrain_moonlight_16b.sh: error: $*" >&2; exit 2; }

[[ -f configs/megatron/moonlight-16b-a3b.args.sh ]] \
    || die "run me from the muon-ds repository root (configs/megatron/moonlight-16b-a3b.args.sh not found in $PWD)"
[[ -n $MEGATRON_LM_DIR ]] || die "set MEGATRON_LM_DIR to a Megatron-LM checkout at tag core_v0.16.1"
[[ -f $MEGATRON_LM_DIR/pretrain_gpt.py ]] \
    || die "MEGATRON_LM_DIR=$MEGATRON_LM_DIR has no pretrain_gpt.py; clone NVIDIA/Megatron-LM and check out core_v0.16.1"
if [[ $MOCK_DATA == 1 ]]; then
    data_args=(--mock-data)
else
    [[ -n $DATA_PATH ]] || die "set DATA_PATH to a Megatron indexed dataset prefix (PREFIX.bin + PREFIX.idx), or MOCK_DATA=1"
    for word in $DATA_PATH; do
        [[ $word =~ ^[0-9.eE+-]+$ ]] && continue  # a blend weight
        [[ -f $word.bin && -f $word.idx ]] \
            || die "dataset $word.bin / $word.idx not found (DATA_PATH=$DATA_PATH); make it with Megatron-LM's tools/preprocess_data.py"
    done
    read -r -a data_words <<< "$DATA_PATH"
    data_args=(--data-path "${data_words[@]}" --split 99,1,0)
fi
if [[ $TOKENIZER_MODEL == /* || $TOKENIZER_MODEL == .* ]]; then
    [[ -d $TOKENIZER_MODEL ]] || die "TOKENIZER_MODEL=$TOKENIZER_MODEL is not a directory"
fi
[[ -z $MOONLIGHT_HF_CONFIG || -e $MOONLIGHT_HF_CONFIG ]] || die "MOONLIGHT_HF_CONFIG=$MOONLIGHT_HF_CONFIG not found"
for name in NNODES NODE_RANK GPUS_PER_NODE TP PP EP ETP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE; do
    [[ ${!name} =~ ^[0-9]+$ ]] || die "$name=${!name} is not a whole number"
done
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"

# Megatron's constraints, checked before any GPU is touched
WORLD=$(( NNODES * GPUS_PER_NODE ))
(( WORLD % (TP * PP) == 0 )) || die "world size $WORLD (NNODES x GPUS_PER_NODE) is not divisible by TP x PP = $(( TP * PP ))"
(( WORLD % (ETP * EP * PP) == 0 )) \
    || die "world size $WORLD is not divisible by ETP x EP x PP = $(( ETP * EP * PP )) (the expert layout)"
(( 64 % EP == 0 )) || die "EP=$EP does not divide Moonlight's 64 routed experts"
DP=$(( WORLD / (TP * PP) ))
(( GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * DP) == 0 )) \
    || die "GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not divisible by MICRO_BATCH_SIZE x data-parallel size = $(( MICRO_BATCH_SIZE * DP ))"
pipeline_args=()
if [[ -n $FIRST_STAGE_LAYERS ]]; then
    (( PP > 1 && (27 - FIRST_STAGE_LAYERS) % (PP - 1) == 0 )) \
        || die "FIRST_STAGE_LAYERS=$FIRST_STAGE_LAYERS leaves $(( 27 - FIRST_STAGE_LAYERS )) layers, not divisible by the other PP-1 stages"
    pipeline_args=(--decoder-first-pipeline-num-layers "$FIRST_STAGE_LAYERS")
else
    (( 27 % PP == 0 )) || die "PP=$PP does not divide Moonlight's 27 layers; set FIRST_STAGE_LAYERS (e.g. PP=4 FIRST_STAGE_LAYERS=6)"
fi

# shellcheck source=../../configs/megatron/moonlight-16b-a3b.args.sh
source configs/megatron/moonlight-16b-a3b.args.sh   # MOONLIGHT_16B_ARGS: the architecture, --optimizer muon, bf16

parallel_args=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${pipeline_args[@]}"
               --expert-model-parallel-size "$EP" --expert-tensor-parallel-size "$ETP"
               --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
(( TP == 1 )) || parallel_args+=(--sequence-parallel)
moonlight_args=(--moonlight-spec)
[[ -z $MOONLIGHT_HF_CONFIG ]] || moonlight_args+=(--moonlight-config "$MOONLIGHT_HF_CONFIG")
training_args=(--micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
               --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine
               --lr-warmup-iters "$WARMUP_ITERS" --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
               --tokenizer-model "$TOKENIZER_MODEL" --trust-remote-code
               --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval "$SAVE_INTERVAL"
               --exit-signal-handler --log-interval 10 --eval-interval 1000 --eval-iters 10)
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of words
extra=($EXTRA_ARGS)

command=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
         --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         -m muon_ds.megatron.launch "$MEGATRON_LM_DIR/pretrain_gpt.py"
         "${MOONLIGHT_16B_ARGS[@]}" "${moonlight_args[@]}" "${parallel_args[@]}" "${data_args[@]}"
         "${training_args[@]}" "${extra[@]}")
export PYTHONPATH="$MEGATRON_LM_DIR${PYTHONPATH:+:$PYTHONPATH}" CUDA_DEVICE_MAX_CONNECTIONS=1
if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
"$PYTHON" -c 'import muon_ds.megatron, megatron.training' 2>/dev/null \
    || die "$PYTHON cannot import muon_ds.megatron and megatron.training: pip install 'muon-ds[megatron]' and check MEGATRON_LM_DIR"
mkdir -p "$CHECKPOINT_DIR"
exec "${command[@]}"
