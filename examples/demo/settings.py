"""The demo's settings: a YAML file (cpu.yaml / gpu.yaml) checked before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("adamw", "muon")


class Train(BaseModel):
    """Batch, budget and evaluation of each run."""

    model_config = ConfigDict(extra="forbid")

    world_size: Optional[int] = Field(None, ge=1)
    seq_len: int = Field(ge=8)
    micro_batch: int = Field(ge=1)
    global_batch: int = Field(ge=1)
    tokens: int = Field(ge=1)
    warmup_fraction: float = Field(ge=0, lt=1)
    evals: int = Field(ge=1)
    val_sequences: int = Field(ge=1)
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)


class Optimizer(BaseModel):
    """What Muon and AdamW share: Moonlight's claim is that AdamW's lr and weight decay carry over."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any]
    train: Train
    optimizer: Optimizer
    deepspeed: dict[str, Any]

    def ds_config(self, optimizer: str, world_size: int) -> dict[str, Any]:
        """The DeepSpeed config of one run: the file's block plus batch sizes, optimizer and schedule."""
        train = self.train
        common = self.optimizer.model_dump()
        common["betas"] = list(common["betas"])
        if optimizer == "muon":
            block = {"type": "Muon", "params": common}
        else:
            block = {"type": "AdamW", "params": dict(common, torch_adam=True)}
        steps = train.steps
        return {
            **self.deepspeed,
            "train_batch_size": train.global_batch,
            "train_micro_batch_size_per_gpu": train.micro_batch,
            "gradient_accumulation_steps": train.global_batch // (train.micro_batch * world_size),
            "optimizer": block,
            "scheduler": {"type": "WarmupCosineLR", "params": {
                "total_num_steps": steps, "warmup_num_steps": max(1, int(train.warmup_fraction * steps)),
                "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}},
            "steps_per_print": 10**9,
        }


def load(path: Path) -> Settings:
    """Read and check a settings file, naming the file and the key in any error."""
    if not path.is_file():
        raise SystemExit(f"error: settings file {path} not found; pass --config with a YAML file like "
                         f"{HERE / 'cpu.yaml'}")
    try:
        raw = yaml.safe_load(path.read_text())
        return Settings(**(raw or {}))
    except yaml.YAMLError as err:
        raise SystemExit(f"error: {path} is not valid YAML: {err}") from None
    except ValidationError as err:
        problems = "\n  ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise SystemExit(f"error: {path}:\n  {problems}") from None


def check_world(settings: Settings, world_size: int) -> None:
    """The global batch must split evenly into ranks x micro-batches (DeepSpeed's rule), said up front."""
    train = settings.train
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise SystemExit(f"error: global_batch={train.global_batch} is not a multiple of world_size ({world_size}) "
                         f"x micro_batch ({train.micro_batch}) = {per_step}; change train.global_batch, "
                         "train.micro_batch or --world-size")
    if settings.deepspeed.get("zero_optimization", {}).get("stage", 0) not in (0, 1, 2):
        raise SystemExit("error: deepspeed.zero_optimization.stage must be 0, 1 or 2 for the Muon optimizer")
