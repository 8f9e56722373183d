"""Crash-safe DeepSpeed checkpoints that resume at any data-parallel world size.

DeepSpeed's ``save_checkpoint`` has rank 0 write ``latest`` while other ranks may still be writing
their shards, so a crash can leave ``latest`` naming a broken checkpoint. :func:`save` writes the
shards with ``save_latest=False``, waits for every rank, marks the tag complete and only then
replaces ``latest`` atomically; it never rewrites a complete tag in place. :func:`resume` loads the
newest complete tag, through DeepSpeed's universal checkpoint (converted once, beside the original)
when the world size changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from deepspeed.runtime.engine import DeepSpeedEngine

log = logging.getLogger(__name__)

COMPLETE = "muon_ds_complete.json"  # in a tag directory: every rank finished writing it
UNIVERSAL = "universal"  # sub-directory of the save directory holding converted tags
PathLike = Union[str, os.PathLike]


def point_at(directory: Path, tag: str, name: str = "latest") -> None:
    """Make ``directory/name`` contain ``tag``, atomically (a reader sees the old or the new tag)."""
    temporary = directory / f".{name}.tmp"
    with open(temporary, "w") as file:
        file.write(tag)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, directory / name)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content))
    os.replace(temporary, path)


def completion(tag_dir: Path) -> Optional[dict[str, Any]]:
    """What :func:`save` recorded for a complete tag (world size, ZeRO stage, time), else None."""
    try:
        return json.loads((tag_dir / COMPLETE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def newest_complete(save_dir: PathLike) -> Optional[str]:
    """The most recently completed tag under ``save_dir`` (None when there is none)."""
    save_dir = Path(save_dir)
    done = [(info["time"], tag_dir.name) for tag_dir in save_dir.iterdir() if tag_dir.is_dir()
            and (info := completion(tag_dir)) is not None] if save_dir.is_dir() else []
    return max(done)[1] if done else None


def _agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's answer, on every rank (ranks may see a shared filesystem at different moments).

    ``device``: the engine's, where the backend can communicate (NCCL needs GPU tensors)."""
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def save(engine: DeepSpeedEngine, save_dir: PathLike, tag: str, client_state: Optional[dict[str, Any]] = None
         ) -> bool:
    """Save ``tag`` on every rank, then point ``latest`` at it; False (nothing written) if it is already complete."""
    save_dir = Path(save_dir)
    if _agree(dist.get_rank() == 0 and completion(save_dir / tag) is not None, engine.device):
        log.info("checkpoint %s is already complete in %s: not rewritten", tag, save_dir)
        return False
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {}, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        _write_json(save_dir / tag / COMPLETE, {"tag": tag, "world_size": engine.dp_world_size,
                                                "zero_stage": engine.zero_optimization_stage(), "time": time.time()})
        point_at(save_dir, tag)
    dist.barrier()
    return True


@contextlib.contextmanager
def _loading_universal(engine: DeepSpeedEngine) -> Iterator[None]:
    """``"checkpoint": {"load_universal": true}`` for one load (DeepSpeed reads it from its config)."""
    before = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = before


def resume(engine: DeepSpeedEngine, save_dir: PathLike) -> Optional[tuple[str, dict[str, Any]]]:
    """Load the newest complete tag; returns (tag, client_state), or None when there is nothing to resume.

    A ZeRO 1-3 checkpoint saved at another data-parallel world size is converted to DeepSpeed's
    universal layout (once, by rank 0, into ``save_dir/universal``) and loaded from there.
    """
    save_dir = Path(save_dir)
    tag = newest_complete(save_dir)
    if tag is None:
        if (save_dir / "latest").is_file():
            raise FileNotFoundError(f"{save_dir}: no complete checkpoint (none has {COMPLETE}); its 'latest' was "
                                    "not written by muon_ds.deepspeed.checkpoint.save: load it with "
                                    "engine.load_checkpoint if you know it is complete")
        return None
    info = completion(save_dir / tag)
    load_dir = save_dir
    if info["world_size"] != engine.dp_world_size and info["zero_stage"] > 0:
        load_dir = save_dir / UNIVERSAL
        error = None
        if dist.get_rank() == 0 and not (load_dir / tag).is_dir():
            from muon_ds.deepspeed.universal import to_universal

            try:
                to_universal(save_dir / tag, load_dir)
            except Exception as err:  # re-raised below on rank 0; the others must not wait for it
                error = err
        if _agree(error is not None, engine.device):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 could not convert {save_dir / tag} to a universal checkpoint (see its log)")
        log.info("checkpoint %s was saved at data-parallel size %d, resuming at %d from its universal copy %s",
                 tag, info["world_size"], engine.dp_world_size, load_dir / tag)
        with _loading_universal(engine):
            path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    else:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
    return tag, client_state
