"""Conversion outputs: never overwrite, never leave a half-written directory that looks finished."""

from __future__ import annotations

import contextlib
import resource
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["refuse_existing", "staged_output", "peak_rss_gib"]


def refuse_existing(path: Path) -> None:
    """Conversions never overwrite: fail before doing any work."""
    if path.exists():
        raise FileExistsError(f"output {path} already exists; refusing to overwrite it")


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh ``OUT.partial`` directory; rename it to ``OUT`` on success, delete it on error."""
    refuse_existing(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out_dir)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
