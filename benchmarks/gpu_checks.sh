#!/usr/bin/env bash
# The GPU proof of issue 11, in one run on one H200 (this workplace's `device` tool), about 6 minutes,
# at most 9.5 (each step has its own `timeout`):
#   1. Newton-Schulz over Moonlight-16B-A3B's 5181 matrices in bf16 (benchmarks/newton_schulz.py), batched by
#      shape and one at a time, eager and through torch.compile (the ns_compile option), each as % of the
#      bf16 matmul peak measured in the same run (standard NS5 FLOP count; target >= 75%);
#   2. one iteration of a TinyLlama-1.1B-shaped Llama under DeepSpeed ZeRO-1, bf16, W=1
#      (benchmarks/deepspeed_optimizer.py --model llama --bf16): DeepSpeed's AdamW, muon-ds's Muon, DeepSpeed's
#      built-in Muon and muon-ds's Muon with ns_compile, in the same run, each as x AdamW (target <= 1.35x);
#   3. (optional) benchmarks/optimizer_step.py at W=1: the step against NS + elementwise, CUDA peak memory.
# Every output lands in $OUT (7 files: summary.md, fused_adam.log, ns_eager.log, deepspeed_llama.log,
# deepspeed_llama.jsonl, ns_compiled.log, optimizer_step.log). A failed or timed-out step is named in
# summary.md and makes the script exit non-zero; the steps after it still run.
#
# Prepare the wheels the device image lacks, once, here in the repository root (about 5 MB; the device has
# Python 3.12 and torch, transformers, ninja, py-cpuinfo, msgpack, einops, psutil, pyyaml, safetensors, tqdm):
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   mkdir -p .whl
#   .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0
#   du -sh .whl   # must stay well under the device tool's 64 MiB (with the working tree)
# Then one device call: command "bash benchmarks/gpu_checks.sh", carry [".whl"], timeout_s 600.
# The result tables are at the end of the reply's output and in $OUT/summary.md.
#
# GPU_CHECKS_TINY=1 (with GPU_CHECKS_PYTHON=.venv/bin/python on the CPU dev machine): the same steps at tiny
# sizes, no wheel install, OUT defaulting to /tmp/gpu_checks: a dry run that proves the script end to end.
set -u -o pipefail
cd "$(dirname "$0")/.."
TINY=${GPU_CHECKS_TINY:-0}
PY=${GPU_CHECKS_PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
FAILED=()
LIMIT_SCALE=$([ "$TINY" = 1 ] && echo 3 || echo 1)  # the 2-core CPU dev machine is slower at tiny sizes than the H200

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.log, its tail on stdout.
step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local start=$SECONDS rc
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name")
    case $rc in
      124 | 137) note "FAILED: $name timed out after ${limit} s" ;;
      *) note "FAILED: $name exited $rc" ;;
    esac
  fi
  note "$name: exit $rc, $((SECONDS - start)) s (log: $name.log)"
  return "$rc"
}

: >"$SUMMARY"
note "# muon-ds GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC')$([ "$TINY" = 1 ] && echo ', TINY dry run')"

if [ "$TINY" != 1 ]; then
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$SUMMARY" 2>&1; then
    note "FAILED: installing the carried wheels (.whl/: see the header for how to prepare them)"
    exit 1
  fi
  export PYTHONPATH=$PWD:/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >>"$SUMMARY" 2>&1
else
  export PYTHONPATH=$PWD
fi
$PY - >>"$SUMMARY" 2>&1 <<'EOF'
import platform, torch, deepspeed, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
EOF
cat "$SUMMARY"

if [ "$TINY" = 1 ]; then
  CONFIG=$(mktemp /tmp/gpu_checks_moonlight_tiny.XXXXXX.json)
  cat >"$CONFIG" <<'EOF'
{"hidden_size": 64, "num_attention_heads": 2, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
 "kv_lora_rank": 32, "intermediate_size": 160, "moe_intermediate_size": 48, "n_shared_experts": 2,
 "n_routed_experts": 8, "first_k_dense_replace": 1, "num_hidden_layers": 3}
EOF
  NS_ARGS=(--config "$CONFIG" --fraction 1 --dtype bfloat16 --matmul-size 256)
  LLAMA_ARGS=(--width 64 --layers 2 --ffn 128 --heads 4 --kv-heads 2 --vocab 256 --seq-len 32 --micro-batch 2
              --steps 1 --warmup 1)
  STEP_ARGS=(--models ns --worlds 1 --repeats 1)
else
  NS_ARGS=(--fraction 1 --dtype bfloat16)  # all 5181 matrices
  LLAMA_ARGS=(--steps 5 --warmup 3)        # TinyLlama-1.1B's shape and micro-batch (8 x 2048 tokens)
  STEP_ARGS=(--worlds 1 --repeats 5)
fi

# DeepSpeed's FusedAdam (AdamW, and the built-in Muon's Adam) is a CUDA extension built at first use: build it
# before anything is timed; if it cannot be built, AdamW runs as torch.optim.AdamW (said in the table's header).
ADAM=()
if [ "$TINY" != 1 ]; then
  step fused_adam 90 $PY -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
    || ADAM=(--torch-adam)
fi
step ns_eager 70 $PY benchmarks/newton_schulz.py "${NS_ARGS[@]}"
step deepspeed_llama 210 $PY benchmarks/deepspeed_optimizer.py --model llama --bf16 --stages 1 --worlds 1 \
  --ns-compile "${ADAM[@]}" "${LLAMA_ARGS[@]}" --out "$OUT/deepspeed_llama.jsonl"
step ns_compiled 140 $PY benchmarks/newton_schulz.py "${NS_ARGS[@]}" --compile
step optimizer_step 45 $PY benchmarks/optimizer_step.py "${STEP_ARGS[@]}"  # optional
[ "$TINY" = 1 ] && rm -f "$CONFIG"

note ""
for name in ns_eager ns_compiled deepspeed_llama optimizer_step; do
  note "## $name"
  grep -E '^(\||model:|[0-9]+ of |device:|peak CUDA|torch.compile:)' "$OUT/$name.log" | tee -a "$SUMMARY"
done
if [ ${#FAILED[@]} -ne 0 ]; then
  note "FAILED steps: ${FAILED[*]} (their logs are in \$OUT)"
  exit 1
fi
note "all steps passed"
