"""Conversion outputs: never overwrite, never report success for an output that is not complete and ours.

An output is built in a fresh, uniquely named hidden directory beside ``OUT`` and renamed to ``OUT``
in one step at the end, so a crash, a full disk or a second conversion to the same ``OUT`` can
neither leave a half-written ``OUT`` nor delete another run's work (or a user's own directories).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError

__all__ = ["refuse_existing", "staged_output", "written", "peak_rss_gib"]


def refuse_existing(path: Path) -> None:
    """Conversions never overwrite: fail before doing any work."""
    if path.exists():
        raise FileExistsError(f"output {path} already exists; refusing to overwrite it")


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield a new private directory; rename it to ``out_dir`` on success, delete it (only it) on error."""
    refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.muon-ds-", suffix=".partial", dir=out_dir.parent))
    try:
        yield staging
        appeared = FileExistsError(f"output {out_dir} appeared while converting (another conversion to the same "
                                   "--out?); refusing to overwrite it")
        if out_dir.exists():
            raise appeared
        try:
            os.rename(staging, out_dir)  # fails if a non-empty out_dir appeared since the check
        except OSError:
            raise appeared from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def written(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(path)``; a failure (typically a full disk: the OS's ENOSPC, safetensors' I/O error, or torch's
    "enforce fail ... unexpected pos") becomes an OSError naming the file and the space left."""
    try:
        write(path)
    except (OSError, RuntimeError, SafetensorError) as err:
        if isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        elif "enforce fail" in str(err):  # torch's zip writer wrote less than it meant to
            reason = "the file was written short"
        else:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        usage = shutil.disk_usage(path.parent)
        full = usage.free < min(2**20, usage.total // 100)
        raise OSError(f"could not write {path}: {reason}; {usage.free / 2**20:.1f} MiB free on its file system"
                      f"{' (the disk is full)' if full else ''}") from None


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
