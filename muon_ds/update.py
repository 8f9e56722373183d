"""Moonlight's per-tensor update rules: Muon's scale, decoupled weight decay, AdamW (Muon's momentum and
Nesterov act on whole batches: :mod:`muon_ds.pipeline`)."""

from __future__ import annotations

import math

import torch

SCALE_MODES = ("moonlight", "shape_scaling", "none")
MOONLIGHT_RMS = 0.2  # Moonlight's update RMS, AdamW's typical one


def update_scale(shape: tuple[int, int], mode: str) -> float:
    """Factor on the orthogonalized update of an A x B matrix.

    moonlight: 0.2 * sqrt(max(A, B)) gives the update AdamW's RMS (about 0.2), so AdamW's lr and
    weight decay carry over; shape_scaling: sqrt(max(1, A / B)) (Keller Jordan's Muon; Megatron-LM's
    name for it); none: 1.
    """
    rows, cols = shape
    if mode == "moonlight":
        return MOONLIGHT_RMS * math.sqrt(max(rows, cols))
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "none":
        return 1.0
    raise ValueError(f"unknown Muon scale mode {mode!r}; valid modes are {list(SCALE_MODES)}")


def decay_weights(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay, W <- W (1 - lr wd), as AdamW and Moonlight's Muon apply it."""
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One bias-corrected AdamW step in place (torch.optim.AdamW's arithmetic, elementwise)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
    decay_weights(param, lr, weight_decay)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)
