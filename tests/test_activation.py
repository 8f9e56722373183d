"""muon_ds takes over "type": "Muon" however DeepSpeed and muon_ds are imported, and can be opted out of."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REGISTERED = ("from deepspeed.runtime.engine import DeepSpeedEngine as E; "
              "print(getattr(E, '_muon_ds_registered', False))")


def python(code: str, cwd: Path = REPO, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **env}, cwd=cwd)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("order", ["import muon_ds, deepspeed", "import deepspeed, muon_ds"])
def test_import_activates_in_either_order(order: str) -> None:
    assert python(f"{order}; {REGISTERED}") == "True"


def test_a_find_spec_probe_before_the_import_does_not_disarm_it() -> None:
    """transformers' is_deepspeed_available() asks importlib.util.find_spec("deepspeed") first."""
    probe = "import importlib.util, muon_ds; importlib.util.find_spec('deepspeed'); import deepspeed"
    assert python(f"{probe}; {REGISTERED}") == "True"


def test_muon_ds_does_not_import_deepspeed_by_itself() -> None:
    assert python("import sys, muon_ds; print('deepspeed' in sys.modules)") == "False"


def installed_hook() -> bool:
    return any((Path(d) / "muon_ds_autoload.pth").exists() for d in site.getsitepackages())


@pytest.mark.skipif(not installed_hook(), reason="muon-ds is not pip-installed here (the hook comes with the wheel)")
def test_installed_hook_activates_unedited_scripts(tmp_path: Path) -> None:
    assert python(f"import deepspeed; {REGISTERED}", cwd=tmp_path) == "True"
    assert python(f"import deepspeed; {REGISTERED}", cwd=tmp_path, MUON_DS_AUTOLOAD="0") == "False"
