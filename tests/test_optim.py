"""The single-process optimizer is Moonlight's Muon + AdamW: checked against an independent float64 version."""

import copy
import math

import pytest
import torch
from torch import nn

from muon_ds.optim import Muon

LR, WD, MU, BETAS, EPS = 0.02, 0.1, 0.95, (0.9, 0.95), 1e-8


def newton_schulz64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Reference:
    """Moonlight's algorithm in float64, written from the paper's description."""

    def __init__(self, named: dict[str, torch.Tensor], muon_names: set[str]) -> None:
        self.w = {k: v.detach().double().clone() for k, v in named.items()}
        self.muon = muon_names
        self.m = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.t = 0

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        self.t += 1
        for k, g in grads.items():
            g = g.double()
            w = self.w[k]
            if k in self.muon:
                self.m[k] = MU * self.m[k] + g
                o = newton_schulz64(g + MU * self.m[k])
                self.w[k] = w * (1 - LR * WD) - LR * 0.2 * math.sqrt(max(w.shape)) * o
            else:
                self.m[k] = BETAS[0] * self.m[k] + (1 - BETAS[0]) * g
                self.v[k] = BETAS[1] * self.v[k] + (1 - BETAS[1]) * g * g
                m_hat, v_hat = self.m[k] / (1 - BETAS[0] ** self.t), self.v[k] / (1 - BETAS[1] ** self.t)
                self.w[k] = w * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"embed": nn.Embedding(11, 8), "up": nn.Linear(8, 20), "down": nn.Linear(20, 8),
                          "lm_head": nn.Linear(8, 11, bias=False)})


def gradients(step: int, net: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in net.named_parameters()}


def test_equals_float64_reference() -> None:
    net = model()
    muon = Muon(net.named_parameters(), lr=LR, weight_decay=WD, ns_dtype="float32")
    ref = Reference(dict(net.named_parameters()), {"up.weight", "down.weight"})
    start = {k: v.detach().double().clone() for k, v in net.named_parameters()}
    for step in range(6):
        grads = gradients(step, net)
        for k, p in net.named_parameters():
            p.grad = grads[k].float()
        muon.step()
        ref.step(grads)
    for k, p in net.named_parameters():
        error = float((p.detach().double() - ref.w[k]).norm() / (ref.w[k] - start[k]).norm())
        assert error < 1e-5, (k, error)


def test_classification_counts() -> None:
    muon = Muon(model().named_parameters(), lr=LR)
    assert muon.counts() == (2, 4)  # up and down weights; embedding, head and biases by AdamW
    assert [(g["use_muon"], len(g["params"])) for g in muon.param_groups] == [(True, 2), (False, 4)]


def test_non_finite_gradient_skips_the_whole_step() -> None:
    net = model()
    muon = Muon(net.named_parameters(), lr=LR, weight_decay=WD)
    for k, p in net.named_parameters():
        p.grad = gradients(0, net)[k].float()
    muon.step()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in muon.state.items()}
    for k, p in net.named_parameters():
        p.grad = gradients(1, net)[k].float()
    net["down"].bias.grad[0] = float("inf")
    muon.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(state[id(p)][k], v) for p, s in muon.state.items() for k, v in s.items())


def test_state_dict_resume_equals_uninterrupted() -> None:
    def run(steps: range, net: nn.Module, opt: Muon) -> None:
        for step in steps:
            for k, p in net.named_parameters():
                p.grad = gradients(step, net)[k].float()
            opt.step()

    a = model()
    opt_a = Muon(a.named_parameters(), lr=LR, weight_decay=WD)
    run(range(3), a, opt_a)
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    run(range(3, 6), a, opt_a)
    b = model()
    b.load_state_dict(saved_model)
    opt_b = Muon(b.named_parameters(), lr=LR, weight_decay=WD)
    opt_b.load_state_dict(saved_opt)
    run(range(3, 6), b, opt_b)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_loading_state_of_another_partitioning_is_refused() -> None:
    net = model()
    opt = Muon(net.named_parameters(), lr=LR)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    state["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'momentum_buffer' of up.weight has shape \\(3,\\)"):
        Muon(model().named_parameters(), lr=LR).load_state_dict(state)


def test_side_learning_rates_follow_a_scheduler() -> None:
    net = model()
    opt = Muon(net.named_parameters(), lr=1e-3, muon_lr=4e-3)
    for g in opt.param_groups:  # what a scheduler does: one lr for every group
        g["lr"] = 2e-3
    assert [g["lr"] * g["lr_ratio"] for g in opt.param_groups] == [pytest.approx(8e-3), pytest.approx(2e-3)]
