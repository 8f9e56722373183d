"""The Megatron-LM patch applies to core_v0.16.1 and makes its argument validation accept muon_ds's Muon.

Needs a Megatron-LM checkout at core_v0.16.1 (not on any package registry): set MEGATRON_LM_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "patches" / "megatron-lm-core_v0.16.1-muon_ds.patch"
CHECKOUT = os.environ.get("MEGATRON_LM_DIR")


def _megatron_lm(tmp_path: Path) -> Path:
    """Megatron-LM's training packages, copied (megatron.core comes from the installed megatron-core)."""
    for package in ("training", "legacy", "post_training", "rl"):
        shutil.copytree(Path(CHECKOUT) / "megatron" / package, tmp_path / "megatron" / package)
    return tmp_path


def _validated(tree: Path, *flags: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(REPO)]), RANK="0", WORLD_SIZE="1")
    run = subprocess.run([sys.executable, str(REPO / "tests" / "megatron_worker_patch.py"), *flags],
                         env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_muon_ds_muon(values: dict, factory: str) -> None:
    assert values["optimizer"] == "muon" and values["use_distributed_optimizer"] and values["overlap_param_gather"]
    assert (values["muon_momentum"], values["muon_use_nesterov"]) == (0.9, True)  # explicit flag wins
    assert (values["muon_extra_scale_factor"], values["muon_tp_mode"]) == (0.2, "distributed")  # Moonlight's
    assert values["factory"] == factory


@pytest.mark.skipif(not CHECKOUT, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")
def test_patch_applies_and_lifts_the_asserts(tmp_path: Path) -> None:
    tree = _megatron_lm(tmp_path)
    subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tree, check=True)
    subprocess.run(["git", "apply", str(PATCH)], cwd=tree, check=True)
    _assert_muon_ds_muon(_validated(tree, "--muon-momentum", "0.9"), "muon_ds.megatron.optimizer")


@pytest.mark.skipif(not CHECKOUT, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")
def test_launcher_does_the_same_without_the_patch(tmp_path: Path) -> None:
    tree = _megatron_lm(tmp_path)
    _assert_muon_ds_muon(_validated(tree, "--launcher", "--muon-momentum", "0.9"), "muon_ds.megatron.launch")
