"""Megatron-LM's own pretrain_gpt.py, unchanged, builds our Moonlight through the patch-free launcher.

Runs on megatron-core 0.16.1 with Megatron-LM core_v0.16.1's training scripts (the archive in
../shared/megatron-lm, tests/megatron_lm.py); tests/test_pretrain_gpt.py trains Moonlight through core_v0.19.0's
pretrain_gpt.py, which builds models another way. Each test
starts one process the way a launch script starts pretrain_gpt.py (``python -m muon_ds.megatron.launch
SCRIPT ARGS``), with a probe script in pretrain_gpt.py's place in a copy of Megatron-LM's training tree:
- the tiny Moonlight's Megatron arguments (configs/megatron/moonlight-tiny.args.sh) with ``--moonlight-config``
  make Megatron-LM's ``gpt_builder`` build the same network as the HF config (on CPU, under
  tests/megatron_cpu.py's test-support patches); arguments that disagree with the config are refused field by
  field; without the flag Megatron-LM's own builder runs;
- examples/megatron/pretrain_moonlight_16b.sh's arguments pass Megatron-LM's validate_args and describe the
  published Moonlight-16B-A3B config.json.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import megatron_lm

REPO = Path(__file__).resolve().parents[1]
CORE_V0_16_1 = pytest.mark.skipif(
    not megatron_lm.ARCHIVES.is_dir() or megatron_lm.installed_version() != megatron_lm.VERSION_016,
    reason="needs megatron-core 0.16.1 and Megatron-LM's training-script archives (tests/megatron_lm.py)")
TINY_HF = REPO / "tests" / "data" / "moonlight-tiny.config.json"
PROBE = "from tests.test_megatron_provider import probe\nprobe()\n"  # pretrain_gpt.py's place
# ``python -m muon_ds.megatron.launch``, after standing in for the triton-only kernels megatron.training
# imports at import time (nothing here runs them)
LAUNCH = ("import sys; from unittest import mock; "
          "sys.modules['megatron.core.transformer.custom_layers.batch_invariant_kernels'] = mock.MagicMock(); "
          "from muon_ds.megatron.launch import main; main()")
BASE = ["--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "1", "--transformer-impl", "local",
        "--use-cpu-initialization", "--use-distributed-optimizer", "--tokenizer-type", "NullTokenizer",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]  # CUDA extensions


def _tiny_args() -> list[str]:
    """The tiny Moonlight's Megatron-LM arguments, as a launch script sourcing the args file gets them."""
    path = REPO / "configs" / "megatron" / "moonlight-tiny.args.sh"
    out = subprocess.run(["bash", "-c", f'source "{path}"; printf "%s\\n" "${{MOONLIGHT_TINY_ARGS[@]}}"'],
                         check=True, capture_output=True, text=True).stdout
    return out.split("\n")[:-1]


def _build(argv: list[str]) -> dict[str, Any]:
    """Parse and validate ``argv`` as pretrain_gpt.py would, then build with Megatron-LM's gpt_builder."""
    import gpt_builders
    import megatron.training.arguments as arguments
    from megatron.training.global_vars import set_args
    from megatron.training.tokenizer import build_tokenizer

    sys.argv = ["pretrain_gpt.py", *argv]
    args = arguments.validate_args(arguments.parse_args())
    build_tokenizer(args)  # sets args.padded_vocab_size, as Megatron-LM's start-up does
    set_args(args)
    try:
        model = gpt_builders.gpt_builder(args, pre_process=True, post_process=True)
    except ValueError as err:
        return {"error": str(err)}
    layer = model.decoder.layers[0]
    return {"shapes": {name: list(p.shape) for name, p in model.named_parameters()},
            "kv_down_proj": type(layer.self_attention.linear_kv_down_proj).__name__,
            "mlps": [type(layer.mlp).__name__ for layer in model.decoder.layers],
            "final_norm": type(model.decoder.final_layernorm).__name__,
            "optimizer": args.optimizer, "moonlight_config": args.moonlight_config}


def _megatron_own(argv: list[str]) -> dict[str, Any]:
    """Without a Moonlight flag: Megatron-LM's own builder, whose local MLA spec does not build in core 0.16.1."""
    try:
        return _build(argv)
    except TypeError as err:
        return {"error": str(err).splitlines()[0]}


def probe() -> None:
    """Runs as the training script under the launcher: what the launch builds, and two contrasting builds."""
    from muon_ds.models.config import architecture_from_hf, mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model
    from tests import megatron_cpu

    megatron_cpu.init_process(rank=0, world_size=1, port=megatron_cpu.free_port())
    argv = sys.argv[1:]
    hf = json.loads(TINY_HF.read_text())
    arch = architecture_from_hf(hf)
    reference = build_moonlight_model(mla_transformer_config(hf, use_cpu_initialization=True), arch.vocab_size,
                                      arch.max_sequence_length)
    without = [a for a in argv if a not in ("--moonlight-config", str(TINY_HF))]
    result = {"launched": _build(argv),
              "reference_shapes": {name: list(p.shape) for name, p in reference.named_parameters()},
              "mismatched": _build([*argv, "--num-experts", "8", "--kv-lora-rank", "16"]),
              "megatron_own": _megatron_own(without)}
    print("PROBE " + json.dumps(result), flush=True)
    megatron_cpu.shutdown()


def probe_16b() -> None:
    """Runs as the training script: validate the 16B launch's arguments; do they describe Moonlight-16B-A3B?"""
    import megatron.training.arguments as arguments

    from muon_ds.megatron.moonlight_provider import architecture_mismatches
    from muon_ds.models.config import load_hf_config

    arguments.get_device_arch_version = lambda: 9  # validate_args asks the GPU under TP; answer as an H100 would
    args = arguments.validate_args(arguments.parse_args())
    config = arguments.core_transformer_config_from_args(args)
    hf = load_hf_config(REPO / "tests" / "data" / "moonlight-16b-a3b.config.json")
    print("PROBE " + json.dumps({"mismatches": architecture_mismatches(hf, config, hf["vocab_size"]),
                                 "optimizer": args.optimizer, "moonlight_spec": args.moonlight_spec,
                                 "sequence_parallel": config.sequence_parallel,
                                 "expert_model_parallel_size": config.expert_model_parallel_size,
                                 "data_parallel_size": args.data_parallel_size,
                                 "muon_extra_scale_factor": args.muon_extra_scale_factor}), flush=True)


def _megatron_lm(tmp_path: Path) -> Path:
    """Megatron-LM core_v0.16.1's training scripts (megatron.core comes from the installed package) and the probes."""
    megatron_lm.training_scripts(megatron_lm.VERSION_016, tmp_path)
    (tmp_path / "pretrain_probe.py").write_text(PROBE)
    (tmp_path / "pretrain_probe_16b.py").write_text(PROBE.replace("probe", "probe_16b"))
    return tmp_path


@CORE_V0_16_1
def test_launcher_builds_moonlight_in_pretrain_gpt(tmp_path: Path) -> None:
    tree = _megatron_lm(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(REPO), os.environ.get("PYTHONPATH", "")]), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", LAUNCH, str(tree / "pretrain_probe.py"),
                          *_tiny_args(), *BASE, "--moonlight-config", str(TINY_HF)],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("PROBE "))[6:])

    launched = result["launched"]
    assert "error" not in launched, launched
    assert launched["optimizer"] == "muon" and launched["moonlight_config"] == str(TINY_HF)
    assert launched["shapes"] == result["reference_shapes"]  # the same network as the HF config's
    assert launched["mlps"] == ["MLP", "MoELayer", "MoELayer"]  # first layer dense
    assert launched["kv_down_proj"] == "TPReplicatedLinear" and launched["final_norm"] == "RMSNorm"

    error = result["mismatched"]["error"]
    assert "num_moe_experts: HF config says 4, Megatron arguments give 8" in error and "kv_lora_rank" in error

    # no Moonlight flag: Megatron-LM's own builder and local MLA spec, untouched (and unable to build MLA on CPU:
    # its DotProductAttention takes no k_channels; muon_ds's spec has its own MLA core attention)
    assert "DotProductAttention.__init__() got an unexpected keyword argument 'k_channels'" in \
        result["megatron_own"]["error"]


@CORE_V0_16_1
def test_16b_launch_arguments_pass_megatron_validation(tmp_path: Path) -> None:
    from tests.test_megatron_example import dry_run_16b

    tree = _megatron_lm(tmp_path / "tree")
    dry = dry_run_16b(tmp_path, TP="2", NNODES="2")
    assert dry.returncode == 0, dry.stderr
    command = shlex.split(dry.stdout)
    script = next(i for i, word in enumerate(command) if word.endswith("pretrain_gpt.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(REPO), os.environ.get("PYTHONPATH", "")]), RANK="0", WORLD_SIZE="16",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1")  # as the script exports
    run = subprocess.run([sys.executable, "-c", LAUNCH, str(tree / "pretrain_probe_16b.py"), *command[script + 1:]],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert result["mismatches"] == []  # configs/megatron/moonlight-16b-a3b.args.sh is the real Moonlight
    assert result["optimizer"] == "muon" and result["muon_extra_scale_factor"] == 0.2 and result["moonlight_spec"]
    assert result["sequence_parallel"] and result["expert_model_parallel_size"] == 8
    assert result["data_parallel_size"] == 8  # 2 nodes x 8 GPUs / TP 2


def test_launcher_refuses_a_missing_script() -> None:
    run = subprocess.run([sys.executable, "-m", "muon_ds.megatron.launch", "no/such/pretrain_gpt.py"],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "training script not found: no/such/pretrain_gpt.py" in run.stderr
