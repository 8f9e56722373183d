"""Real text already on the machine as byte-level tokens: by default the Python standard library.

Files are split into training and validation by a hash of their path, so validation text is never
seen in training. Every run draws the same windows for the same step, whatever the optimizer.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

SUFFIXES = (".py", ".txt", ".rst", ".md")
SEPARATOR = b"\n\n"
VALIDATION_ONE_IN = 40


def default_root() -> Path:
    """The standard library of the running Python: source and docstrings, plus its text files."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root: Path) -> list[Path]:
    """Text files under ``root`` (not installed third-party packages), in a fixed order."""
    files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                   and "site-packages" not in p.relative_to(root).parts)
    return files


def check_root(root: Path, seq_len: int) -> None:
    """Fail early, naming the directory, when it cannot give both splits enough text."""
    if not root.is_dir():
        raise SystemExit(f"error: data directory {root} does not exist; pass --data with a directory of "
                         f"{'/'.join(SUFFIXES)} files (default: the Python standard library)")
    train, val = split(root)
    for name, data in (("training", train), ("validation", val)):
        if data.numel() < 4 * (seq_len + 1):
            raise SystemExit(f"error: {root} gives only {data.numel()} {name} bytes from its "
                             f"{'/'.join(SUFFIXES)} files; point --data at a bigger directory")


def split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, validation bytes) as uint8 tensors; about 1 file in 40 is validation."""
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for path in text_files(root):
        is_val = zlib.crc32(str(path.relative_to(root)).encode()) % VALIDATION_ONE_IN == 0
        parts[is_val].append(path.read_bytes())
    def tokens(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(SEPARATOR.join(chunks)), dtype=torch.uint8)
    return tokens(parts[False]), tokens(parts[True])


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Sequences of ``seq_len`` tokens beginning at ``starts``, as int64 token ids."""
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return data[index].long()


def step_batch(data: torch.Tensor, step: int, seed: int, global_batch: int, seq_len: int) -> torch.Tensor:
    """The global batch of ``step``: identical for every optimizer and every world size."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len, (global_batch,), generator=generator)
    return windows(data, starts, seq_len)


def validation_batch(data: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` evenly spaced validation sequences."""
    starts = torch.linspace(0, data.numel() - seq_len - 1, count).long()
    return windows(data, starts, seq_len)
