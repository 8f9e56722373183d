"""A plain Hugging Face Trainer script trains with muon_ds's Muon from ``--deepspeed ds.json`` alone.

Two ways to activate muon_ds are covered: a source checkout runs the unchanged script through
``examples/with_muon_ds.py``; an installed wheel needs nothing (its autoload hook), which is run
only where muon-ds is installed with that hook (as in CI).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import REPO, free_port

pytest.importorskip("accelerate", reason="the Trainer's DeepSpeed integration needs accelerate")

DS_CONFIG = REPO / "examples" / "hf_trainer" / "ds_muon_zero1.json"
DS_CONFIG_ZERO3 = REPO / "examples" / "hf_trainer" / "ds_muon_zero3.json"
MUON_LINE = "Moonlight Muon"


def autoload_installed() -> bool:
    """muon-ds is pip-installed together with its ``muon_ds_autoload.pth`` hook."""
    try:
        files = importlib.metadata.distribution("muon-ds").files or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(f.name == "muon_ds_autoload.pth" for f in files)


def run_trainer(out: Path, *launch: str, config: Path = DS_CONFIG, verbosity: str = "warning") -> str:
    """Train for a few steps on 2 CPU ranks with torchrun; returns the combined output."""
    args = ["--deepspeed", str(config), "--output_dir", str(out), "--max_steps", "8",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--weight_decay", "0.1",
            "--warmup_steps", "1", "--logging_steps", "2", "--report_to", "none", "--save_strategy", "no",
            "--use_cpu", "--seq_len", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TRANSFORMERS_VERBOSITY=verbosity)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), *launch, "-m", "examples.hf_trainer.train", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def assert_trained_with_muon(out: Path, output: str) -> None:
    assert MUON_LINE in output and "matrices -> Muon" in output, output[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.2, losses


def test_checkout_with_wrapper(tmp_path: Path) -> None:
    output = run_trainer(tmp_path, str(REPO / "examples" / "with_muon_ds.py"))
    assert_trained_with_muon(tmp_path, output)


@pytest.mark.skipif(not autoload_installed(), reason="muon-ds is not pip-installed with its autoload hook")
def test_installed_wheel_needs_no_edit(tmp_path: Path) -> None:
    output = run_trainer(tmp_path)
    assert_trained_with_muon(tmp_path, output)


def test_zero3_builds_the_model_under_zero_init(tmp_path: Path) -> None:
    """Under a ZeRO-3 JSON the Trainer builds the model partitioned (zero.Init): the local tensors are empty,
    yet the same matrices go to Muon as at ZeRO-1."""
    output = run_trainer(tmp_path, str(REPO / "examples" / "with_muon_ds.py"), config=DS_CONFIG_ZERO3,
                         verbosity="info")
    assert "under ZeRO stage 3 [DeepSpeedZeroOptimizer_Stage3]" in output
    assert "Detected DeepSpeed ZeRO-3: activating zero.init() for this model" in output
    assert_trained_with_muon(tmp_path, output)
    from transformers import AutoConfig, AutoModelForCausalLM

    from muon_ds.optim import Muon

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "examples" / "hf_trainer" /
                                                                        "tiny_moonlight.json"))
    muon, adamw = Muon(model.named_parameters()).counts()  # one process, whole tensors
    assert muon > 0 and f"{muon} matrices -> Muon, {adamw} tensors -> AdamW" in output
