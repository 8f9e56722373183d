"""The Megatron tests again, on megatron-core 0.19.2 (prepared by tests/megatron_lm.py beside the venv's 0.16.1).

One pytest subprocess runs the Megatron test modules with 0.19 first on PYTHONPATH (their rank subprocesses
inherit it): the settings and views, the optimizer's layout equivalences (DP2-distopt, TP2+SP, EP2, PP2,
TP2xEP2, TP2xDP2 equal DP1, resume), the Moonlight model against transformers' logits and gradients, the
converter's verify and the tiny training example.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

from tests import megatron_lm  # noqa: E402
from tests.distributed import REPO  # noqa: E402

# the modules that import megatron-core (the converter's and configs' pure tests do not; the patch test and
# tests/test_pretrain_gpt.py cover both releases themselves)
MODULES = ("test_megatron_settings.py", "test_megatron_optimizer.py", "test_moonlight_megatron.py",
           "test_moonlight_parallel.py", "test_megatron_example.py")


@pytest.mark.skipif(megatron_lm.installed_version() == megatron_lm.VERSION, reason="already running on 0.19")
def test_megatron_tests_pass_on_megatron_core_019() -> None:
    path = [str(p) for p in megatron_lm.pythonpath(megatron_lm.VERSION)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, str(REPO), os.environ.get("PYTHONPATH", "")]))
    version = subprocess.run([sys.executable, "-c", "import megatron.core; print(megatron.core.__version__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert version == megatron_lm.VERSION
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          *(str(REPO / "tests" / m) for m in MODULES)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(f"megatron-core {version}: {summary}")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
