#!/usr/bin/env bash
# Launch examples/deepspeed/train.py with `deepspeed` or `torchrun`, on one node or several.
# Run it from the repository root; each setting below may also come from the environment.
#
#   one node, 8 GPUs, ZeRO-1, bf16:            bash examples/deepspeed/launch.sh
#   same with torchrun, ZeRO-2:                LAUNCHER=torchrun ZERO=2 bash examples/deepspeed/launch.sh
#   2 CPU ranks here (fp32; gloo):             GPUS_PER_NODE=2 PRECISION=fp32 bash examples/deepspeed/launch.sh
#   2 nodes: run on EACH node, NODE_RANK 0/1:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/deepspeed/launch.sh
#   Slurm: examples/slurm/deepspeed.sbatch (srun, one task per GPU, or one launcher per node).
set -euo pipefail

LAUNCHER=${LAUNCHER:-deepspeed}          # deepspeed | torchrun
ZERO=${ZERO:-1}                          # ZeRO stage: 0 | 1 | 2
PRECISION=${PRECISION:-bf16}             # bf16 | fp32
NNODES=${NNODES:-1}                      # nodes in the job
NODE_RANK=${NODE_RANK:-0}                # this node's index, 0 .. NNODES-1
GPUS_PER_NODE=${GPUS_PER_NODE:-}         # ranks per node; empty: every GPU nvidia-smi lists
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}    # node 0's address (multi-node: a name every node resolves)
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero${ZERO}_${PRECISION}.json}
TRAIN_ARGS=${TRAIN_ARGS:---steps 200}    # more arguments of train.py (--checkpoint-dir, --width, ...)
export MUON_DS_COLLECTIVE_TIMEOUT=${MUON_DS_COLLECTIVE_TIMEOUT:-600}  # seconds before a stalled rank fails the job

die() { echo "launch.sh: error: $*" >&2; exit 2; }

[[ -f examples/deepspeed/train.py ]] || die "run me from the muon-ds repository root (examples/deepspeed/train.py not found in $PWD)"
[[ $ZERO =~ ^[012]$ ]] || die "ZERO=$ZERO: the Muon optimizer supports ZeRO stages 0, 1 and 2"
[[ -f $DS_CONFIG ]] || die "DeepSpeed config $DS_CONFIG not found; set ZERO (0|1|2) and PRECISION (bf16|fp32), or DS_CONFIG"
if [[ -z $GPUS_PER_NODE ]]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $GPUS_PER_NODE -gt 0 ]] || die "no GPU found; set GPUS_PER_NODE (CPU ranks: GPUS_PER_NODE=2)"
fi
[[ $NODE_RANK -lt $NNODES ]] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"

# shellcheck disable=SC2086  # TRAIN_ARGS is a list of words
case $LAUNCHER in
    deepspeed)
        if [[ $NNODES -eq 1 ]]; then
            exec deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" \
                examples/deepspeed/train.py --deepspeed-config "$DS_CONFIG" $TRAIN_ARGS
        fi
        # Multi-node without ssh/pdsh: the same command on every node, as torchrun does.
        exec deepspeed --no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK" --num_gpus "$GPUS_PER_NODE" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
            examples/deepspeed/train.py --deepspeed-config "$DS_CONFIG" $TRAIN_ARGS ;;
    torchrun)
        exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
            examples/deepspeed/train.py --deepspeed-config "$DS_CONFIG" $TRAIN_ARGS ;;
    *) die "LAUNCHER=$LAUNCHER: use deepspeed or torchrun (srun: examples/slurm/deepspeed.sbatch)" ;;
esac
