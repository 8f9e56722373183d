"""TEST SUPPORT ONLY: a megatron-core 0.19 environment for Python 3.11, prepared from the package registry.

megatron-core 0.17+ publishes only cp312 wheels, but its Python code runs on 3.11; its one compiled file,
the dataset index helpers, is rebuilt here for this interpreter (from the helpers.cpp the wheel ships, with
pybind11). It also needs ``triton`` (imported unconditionally by its MoE ops), which is installed beside it,
not into the test venv, so the megatron-core 0.16.1 tests keep their environment.

``python -m tests.megatron_core_019`` (or :func:`prepare`) downloads, unpacks and builds once into
``$MUON_DS_TEST_CACHE`` (default ``~/.cache/muon-ds-tests``) and prints the PYTHONPATH entries; later calls
reuse the directory. :func:`pythonpath` is what tests put first on PYTHONPATH to run on 0.19.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.19.2"
DEPENDENCIES = ("triton==3.9.0", "pybind11>=2.12")  # six (Megatron-LM's training scripts) is a test extra
CACHE = Path(os.environ.get("MUON_DS_TEST_CACHE", Path.home() / ".cache" / "muon-ds-tests"))
ROOT = CACHE / f"megatron-core-{VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
SITE, DEPS, DONE = ROOT / "site", ROOT / "deps", ROOT / "complete"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def _build_helpers(site: Path, deps: Path) -> None:
    """Compile megatron/core/datasets/helpers.cpp for this interpreter, as Megatron's own Makefile would."""
    datasets = site / "megatron" / "core" / "datasets"
    include = subprocess.run([sys.executable, "-c", "import pybind11; print(pybind11.get_include())"],
                             env=dict(os.environ, PYTHONPATH=str(deps)), check=True, capture_output=True,
                             text=True).stdout.strip()
    target = datasets / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(["g++", "-O3", "-Wall", "-shared", "-std=c++11", "-fPIC", f"-I{include}",
                    f"-I{sysconfig.get_paths()['include']}", str(datasets / "helpers.cpp"), "-o", str(target)],
                   check=True)


def prepare() -> list[Path]:
    """Download, unpack and build megatron-core 0.19 once (idempotent, safe under concurrent test runs)."""
    ROOT.parent.mkdir(parents=True, exist_ok=True)
    with open(ROOT.parent / f"{ROOT.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not DONE.exists():
            shutil.rmtree(ROOT, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
                _pip("download", "--no-deps", "--python-version", "3.12", "--only-binary=:all:",
                     f"megatron-core=={VERSION}", "-d", tmp)
                (wheel,) = Path(tmp).glob("megatron_core-*.whl")
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(Path(tmp) / "site")
                _pip("install", "--no-deps", "--target", str(Path(tmp) / "deps"), *DEPENDENCIES)
                _build_helpers(Path(tmp) / "site", Path(tmp) / "deps")
                ROOT.mkdir()
                (Path(tmp) / "site").rename(SITE)
                (Path(tmp) / "deps").rename(DEPS)
            DONE.write_text(VERSION)
    return pythonpath()


def pythonpath() -> list[Path]:
    """The entries to put first on PYTHONPATH (after :func:`prepare`)."""
    return [SITE, DEPS]


if __name__ == "__main__":
    print(os.pathsep.join(str(p) for p in prepare()))
