"""The demo (``python -m examples.demo``) end to end at a tiny budget, and its input checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed import REPO

CPU_SETTINGS = REPO / "examples" / "demo" / "cpu.yaml"


def tiny_settings(path: Path, **train: int) -> Path:
    """cpu.yaml shrunk to a few seconds per run."""
    settings = yaml.safe_load(CPU_SETTINGS.read_text())
    settings["model"].update(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                             n_routed_experts=4, max_position_embeddings=64)
    settings["train"].update(seq_len=32, micro_batch=2, global_batch=4, tokens=4 * 32 * 12, evals=2,
                             val_sequences=4, **train)
    path.write_text(yaml.safe_dump(settings))
    return path


def expected_muon_matrices(model: dict) -> int:
    """Attention q, kv_a, kv_b, o per layer; 3 dense MLP matrices; per MoE layer gate+up+down per expert + 3 shared."""
    layers, dense = model["num_hidden_layers"], model["first_k_dense_replace"]
    return 4 * layers + 3 * dense + (layers - dense) * (3 * model["n_routed_experts"] + 3)


def test_demo_trains_both_and_reports(tmp_path: Path) -> None:
    config = tiny_settings(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "examples.demo", "--config", str(config), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| Muon (muon_ds) |" in proc.stdout and "| AdamW |" in proc.stdout
    assert (out / "loss_vs_tokens.png").stat().st_size > 10_000
    model = yaml.safe_load(config.read_text())["model"]
    for name in ("adamw", "muon"):
        history = json.loads((out / f"{name}.json").read_text())
        assert history["val"][-1][1] < history["val"][0][1] - 0.3, name  # it learned something
        assert history["train"][-1][0] == 12 * 4 * 32
    muon = json.loads((out / "muon.json").read_text())
    # Experts' fused gate_up_proj must split into gate and up per expert; routers/embeddings/head/norms are AdamW.
    layers = model["num_hidden_layers"]
    assert muon["counts"] == [expected_muon_matrices(model), 2 + 3 * layers + (layers - 1) + 1]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"adamw", "muon", "muon_tokens_to_adamw_final"}


@pytest.mark.parametrize("argv, message", [
    (["--config", "no/such.yaml"], "settings file no/such.yaml not found"),
    (["--data", "/no/such/dir"], "data directory /no/such/dir does not exist"),
    (["--world-size", "3"], "global_batch=16 is not a multiple of world_size (3)"),
    (["--device", "cuda"], None),
])
def test_bad_input_is_refused_before_training(argv: list[str], message: str | None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from examples.demo.__main__ import main

    if message is None:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        message = "--device cuda but torch sees no CUDA GPU"
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(CPU_SETTINGS), "--device", "cpu", *argv] if "--device" not in argv else argv)
    assert message in str(exc.value)


def test_bad_settings_name_the_key(tmp_path: Path) -> None:
    from examples.demo.__main__ import main

    settings = yaml.safe_load(CPU_SETTINGS.read_text())
    settings["train"]["learning_rate"] = 1.0
    del settings["optimizer"]["lr"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(bad), "--device", "cpu"])
    assert "train.learning_rate" in str(exc.value) and "optimizer.lr" in str(exc.value)


def test_tokens_to_reach_interpolates_the_first_crossing() -> None:
    from examples.demo.report import tokens_to_reach

    curve = [[0, 5.0], [100, 3.0], [200, 2.0], [300, 2.5], [400, 1.0]]
    assert tokens_to_reach(curve, 2.5) == pytest.approx(150)
    assert tokens_to_reach(curve, 5.0) == 0
    assert tokens_to_reach(curve, 0.5) is None
