"""Our megatron-core Moonlight model, in one CPU process: published parameter counts, and logits equal
to transformers' DeepseekV3ForCausalLM after conversion (TP=1), with a mis-mapped negative control."""

import importlib.util
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

from muon_ds.cli import main
from muon_ds.convert import hf_to_megatron as hf_to_megatron_module
from muon_ds.convert.hf_to_megatron import hf_to_megatron
from muon_ds.convert.layout import GLU, Parallelism, shard
from muon_ds.convert.random_hf import write_random_hf_checkpoint
from muon_ds.convert.verify import verify_checkpoint
from tests import megatron_cpu

DATA = Path(__file__).parent / "data"
TINY = json.loads((DATA / "moonlight-tiny.config.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def megatron_world() -> Iterator[None]:
    megatron_cpu.init_process(rank=0, world_size=1, port=megatron_cpu.free_port())
    yield
    megatron_cpu.shutdown()
    megatron_cpu.restore()  # leave torch.cuda as found for the rest of the session


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bf16 files with the float32 expert bias, as Moonlight stores them; both models run in float32
    return write_random_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny") / "hf", dtype=torch.bfloat16)


def test_parameter_counts_match_the_published_ones() -> None:
    from muon_ds.models.config import architecture_from_hf, mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model

    hf = json.loads((DATA / "moonlight-16b-a3b.config.json").read_text())
    arch = architecture_from_hf(hf)
    config = mla_transformer_config(hf, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        model = build_moonlight_model(config, arch.vocab_size, arch.max_sequence_length)
    topk, experts = hf["num_experts_per_tok"], hf["n_routed_experts"]
    total = activated = 0.0
    for name, param in model.named_parameters():
        assert param.device.type == "meta", name
        if name.startswith(("embedding.", "output_layer.")):
            continue
        total += param.numel()
        activated += param.numel() * (topk / experts if ".experts.local_experts." in name else 1)
    assert round(total / 1e9, 2) == 15.29
    assert round(activated / 1e9, 2) == 2.24


def test_converted_logits_equal_transformers(hf_dir: Path, tmp_path: Path) -> None:
    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(), progress=False)
    result = verify_checkpoint(hf_dir, tmp_path / "mg", num_tokens=24)
    assert result.max_abs_logit > 0.5  # logits are not trivially small
    assert result.passed, result
    assert main(["convert", "verify", "--hf", str(hf_dir), "--megatron", str(tmp_path / "mg"), "--device", "cpu"]) == 0


def test_swapped_gate_and_up_fails_verification(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def mis_mapped(tensors: list[torch.Tensor], split: str, tp: int, tp_rank: int) -> torch.Tensor:
        return shard(tensors[::-1] if split == GLU else tensors, split, tp, tp_rank)

    monkeypatch.setattr(hf_to_megatron_module, "shard", mis_mapped)
    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(), progress=False)
    result = verify_checkpoint(hf_dir, tmp_path / "mg", num_tokens=24)
    assert not result.passed
    assert result.max_abs_diff > 100 * result.rtol * result.max_abs_logit
    assert main(["convert", "verify", "--hf", str(hf_dir), "--megatron", str(tmp_path / "mg"), "--device", "cpu"]) == 1



def test_backend_choice_is_checked() -> None:
    from muon_ds.models.spec import backend

    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        backend("tensorrt")


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TransformerEngine present")
def test_te_backend_without_transformer_engine_is_a_clear_error() -> None:
    from muon_ds.models.spec import backend

    with pytest.raises(ImportError, match="needs TransformerEngine"):
        backend("te")


def test_verify_cli_runs_on_a_cpu_only_torch(hf_dir: Path, tmp_path: Path) -> None:
    """`muon-ds convert verify --device cpu` as a user runs it: a fresh process without the tests' CPU
    stand-ins, CUDA hidden (conversion jobs often run on CPU nodes)."""
    import os
    import subprocess
    import sys

    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(), progress=False)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo),
               MASTER_PORT=str(megatron_cpu.free_port()))
    run = subprocess.run([sys.executable, "-m", "muon_ds.cli", "convert", "verify", "--hf", str(hf_dir),
                          "--megatron", str(tmp_path / "mg"), "--device", "cpu", "--tokens", "16"],
                         env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and ": OK" in run.stdout, run.stdout + run.stderr[-3000:]
