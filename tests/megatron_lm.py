"""TEST SUPPORT ONLY: the two megatron-core releases the Megatron tests run on, and Megatron-LM's training scripts.

megatron-core 0.16.1 is the test venv's (a pyproject test extra). megatron-core 0.19 is prepared here for
Python 3.11 from the package registry:

megatron-core 0.17+ publishes only cp312 wheels, but its Python code runs on 3.11; its one compiled file,
the dataset index helpers, is rebuilt here for this interpreter (from the helpers.cpp the wheel ships, with
pybind11). It also needs ``triton`` (imported unconditionally by its MoE ops), which is installed beside it,
not into the test venv, so the megatron-core 0.16.1 tests keep their environment; tests/py311_compat gives
Python 3.11 the ``typing.override`` that 0.19's code imports.

``python -m tests.megatron_lm`` (or :func:`prepare`) downloads, unpacks and builds once into
``$MUON_DS_TEST_CACHE`` (default ``~/.cache/muon-ds-tests``) and prints the PYTHONPATH entries; later calls
reuse the directory. :func:`pythonpath` is what tests put first on PYTHONPATH to run on 0.19. Megatron-LM's
``pretrain_gpt.py`` (either release) also needs triton: :func:`pythonpath` ``(VERSION_016, triton=True)``.

Megatron-LM itself is not on the registries: its training scripts (pretrain_gpt.py and megatron/training,
without megatron/core) come as archives from ``$MEGATRON_LM_ARCHIVES`` (default ``../shared/megatron-lm``
beside the checkout); :func:`training_scripts` extracts one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

VERSION_016, VERSION = "0.16.1", "0.19.2"
VERSIONS = (VERSION_016, VERSION)
ARCHIVES = Path(os.environ.get("MEGATRON_LM_ARCHIVES", Path(__file__).resolve().parents[2] / "shared" / "megatron-lm"))
ARCHIVE_TAGS = {VERSION_016: "core_v0.16.1", VERSION: "core_v0.19.0"}  # the Megatron-LM tag paired with each
DEPENDENCIES = ("triton==3.9.0", "pybind11>=2.12")  # six (Megatron-LM's training scripts) is a test extra
CACHE = Path(os.environ.get("MUON_DS_TEST_CACHE", Path.home() / ".cache" / "muon-ds-tests"))
ROOT = CACHE / f"megatron-core-{VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
SITE, DEPS = ROOT / "site", ROOT / "deps"
EMERGING_OPTIMIZERS = "0.3.0"


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


def _once(root: Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp)`` fills a fresh directory that becomes ``root``, once (a lock serialises concurrent runs)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
                build(Path(tmp))
                Path(tmp, "complete").touch()
                Path(tmp).rename(root)
                Path(tmp).mkdir()  # for TemporaryDirectory's clean-up
    return root


def _download_wheel(requirement: str, into: Path) -> None:
    """A cp312 / py3.12-only wheel, unpacked into ``into`` (its Python code runs on 3.11)."""
    with tempfile.TemporaryDirectory() as wheels:
        _pip("download", "--no-deps", "--python-version", "3.12", "--only-binary=:all:", requirement, "-d", wheels)
        (wheel,) = Path(wheels).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(into)


def _build_019(tmp: Path) -> None:
    _download_wheel(f"megatron-core=={VERSION}", tmp / "site")
    _pip("install", "--no-deps", "--target", str(tmp / "deps"), *DEPENDENCIES)
    _build_helpers(tmp / "site", tmp / "deps")


def prepare() -> list[Path]:
    """Download, unpack and build megatron-core 0.19 once (idempotent, safe under concurrent test runs)."""
    _once(ROOT, _build_019)
    return [SITE, DEPS]


def emerging_optimizers() -> Path:
    """megatron-core 0.19's native Muon needs NVIDIA's emerging-optimizers (py3.12-only metadata, runs on 3.11 with
    tests/py311_compat) and absl-py: prepared once beside megatron-core 0.19, for benchmarks/megatron_native_muon.py."""

    def build(tmp: Path) -> None:
        _download_wheel(f"emerging-optimizers=={EMERGING_OPTIMIZERS}", tmp)
        _pip("install", "--no-deps", "--target", str(tmp), "absl-py")

    return _once(CACHE / f"emerging-optimizers-{EMERGING_OPTIMIZERS}", build)


def pythonpath(version: str, triton: bool = False) -> list[Path]:
    """The entries to put first on PYTHONPATH to run on ``version`` (preparing 0.19 first if needed): for 0.19 the
    unpacked wheel, triton and the ``typing.override`` stand-in; for 0.16.1 (the venv's) triton if asked."""
    if version == VERSION:
        prepare()
        return [SITE, DEPS, Path(__file__).parent / "py311_compat"]
    if triton:
        prepare()
        return [DEPS]
    return []


def installed_version() -> str:
    """The megatron-core release this process imports."""
    import megatron.core

    return megatron.core.__version__


def training_scripts(version: str, dest: Path) -> Path:
    """Megatron-LM's training scripts of the tag paired with ``version``, extracted into ``dest``."""
    archive = ARCHIVES / f"megatron-lm-{ARCHIVE_TAGS[version]}-training.tar.gz"
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} not found: set MEGATRON_LM_ARCHIVES to the directory holding the "
                                "Megatron-LM training-script archives")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


if __name__ == "__main__":
    print(os.pathsep.join(str(p) for p in pythonpath(VERSION)))
