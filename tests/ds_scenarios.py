"""Test support shared by the DeepSpeed worker and the tests: a tiny LM, its data and configs,
and the single-process reference run with muon_ds's own optimizer."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

VOCAB, WIDTH, SEQ, GLOBAL_BATCH, STEPS = 37, 24, 8, 24, 3
OPTIONS = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": "float32"}
TAGGED_ADAMW = ("mix.weight",)  # a hidden matrix a user sends to AdamW with use_muon=False


class TinyLM(nn.Module):
    """Its hidden matrices (960 + 960 + 576 elements) are cut by ZeRO partition boundaries at W = 2, 3, 4."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, 40)
        self.down = nn.Linear(40, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH, bias=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens[:, :-1])
        h = h + self.down(torch.tanh(self.up(h)))
        h = h + self.mix(h)
        logits = self.lm_head(self.norm(h))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def global_batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def micro_batch(step: int, micro: int, rank: int, world_size: int, accumulation: int) -> torch.Tensor:
    size = GLOBAL_BATCH // (world_size * accumulation)
    chunk = micro * world_size + rank
    return global_batch(step)[chunk * size:(chunk + 1) * size]


def ds_config(stage: int, world_size: int, accumulation: int = 1, **extra: Any) -> dict[str, Any]:
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world_size * accumulation),
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "Muon", "params": dict(OPTIONS)},
        "zero_optimization": {"stage": stage},
    }
    config.update(extra)
    return config


def reference_weights(steps: int = STEPS, clip: Optional[float] = None,
                      adamw: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One process, the whole global batch per step, muon_ds's Muon (and torch's clipping)."""
    from muon_ds.optim import Muon

    model = make_model()
    for name in adamw:
        model.get_parameter(name).use_muon = False
    optimizer = Muon(model.named_parameters(), **OPTIONS)
    for step in range(steps):
        optimizer.zero_grad()
        model(global_batch(step)).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def initial_weights() -> dict[str, torch.Tensor]:
    return copy.deepcopy(make_model().state_dict())


def update_error(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 start: dict[str, torch.Tensor]) -> float:
    """Largest relative error of the weight update over parameters: ||W - W_ref|| / ||W_ref - W_0||."""
    return max(float((weights[k].float() - reference[k]).norm() / (reference[k] - start[k]).norm())
               for k in reference)
