"""Each Megatron-LM patch applies to the training scripts of its tag (Megatron-LM's archives, ../shared/megatron-lm)
and not to the other's. tests/test_pretrain_gpt.py trains through the patched scripts of both releases."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import megatron_lm
from tests.distributed import REPO

PATCHES = {megatron_lm.VERSION_016: REPO / "patches" / "megatron-lm-core_v0.16.1-muon_ds.patch",
           megatron_lm.VERSION: REPO / "patches" / "megatron-lm-core_v0.19.0-muon_ds.patch"}

pytestmark = pytest.mark.skipif(not megatron_lm.ARCHIVES.is_dir(),
                                reason=f"Megatron-LM training-script archives not found at {megatron_lm.ARCHIVES}")


@pytest.mark.parametrize("version", megatron_lm.VERSIONS)
def test_patch_applies_to_its_release_only(version: str, tmp_path: Path) -> None:
    tree = megatron_lm.training_scripts(version, tmp_path)
    for patch_version, patch in PATCHES.items():
        check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=tree, capture_output=True, text=True)
        assert (check.returncode == 0) == (patch_version == version), (patch.name, check.stderr)
