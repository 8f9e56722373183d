"""The single-process optimizer is Moonlight's Muon + AdamW: checked against an independent float64 version."""

import copy
import logging
import math
import warnings
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
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


def reference_errors(net: nn.Module, muon: Muon, steps: int) -> dict[str, float]:
    """Train ``net`` with ``muon`` and the float64 reference on the same gradients; each parameter's
    distance from the reference relative to how far the reference moved."""
    ref = Reference(dict(net.named_parameters()), {"up.weight", "down.weight"})
    start = {k: v.detach().double().clone() for k, v in net.named_parameters()}
    for step in range(steps):
        grads = gradients(step, net)
        for k, p in net.named_parameters():
            p.grad = grads[k].float()
        muon.step()
        ref.step(grads)
    return {k: float((p.detach().double() - ref.w[k]).norm() / (ref.w[k] - start[k]).norm())
            for k, p in net.named_parameters()}


def test_equals_float64_reference() -> None:
    net = model()
    errors = reference_errors(net, Muon(net.named_parameters(), lr=LR, weight_decay=WD, ns_dtype="float32"), 6)
    assert max(errors.values()) < 1e-5, errors


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


def one_step(opt_options: dict, lr: Optional[float] = None, grad_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The weight change of one step on ``model()`` with gradients(0) (times ``grad_scale``)."""
    net = model()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = Muon(net.named_parameters(), **opt_options)
    if lr is not None:
        for g in opt.param_groups:  # what a scheduler does: one lr for every group
            g["lr"] = lr
    for k, p in net.named_parameters():
        p.grad = gradients(0, net)[k].float() * grad_scale
    opt.step()
    return {k: p.detach() - start[k] for k, p in net.named_parameters()}


def test_side_learning_rates_follow_a_scheduler() -> None:
    scheduled = one_step({"lr": 1e-3, "muon_lr": 4e-3, "ns_dtype": "float32"}, lr=2e-3)
    muon_at_8e3 = one_step({"lr": 8e-3, "ns_dtype": "float32"})
    adamw_at_2e3 = one_step({"lr": 2e-3, "ns_dtype": "float32"})
    for k, delta in scheduled.items():
        expected = muon_at_8e3[k] if k in ("up.weight", "down.weight") else adamw_at_2e3[k]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("override,message", [
    ({"momentum": 1.5}, "Muon param group 0: momentum: Input should be less than 1"),
    ({"ns_steps": 0}, "Muon param group 0: ns_steps: Input should be greater than or equal to 1"),
    ({"weight_decay": -0.1}, "Muon param group 0: weight_decay: Input should be greater than or equal to 0"),
    ({"lr": float("inf")}, "Muon param group 0: lr: Input should be a finite number"),
    ({"momentm": 0.9}, r"Muon param group 0: unknown key\(s\) \['momentm'\]; valid keys are \['adam_lr'"),
])
def test_param_group_overrides_are_validated(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Muon([{"params": list(model().named_parameters()), **override}], lr=LR)


def test_param_group_override_is_used() -> None:
    net = model()
    named = dict(net.named_parameters())
    opt = Muon([{"params": [("up.weight", named["up.weight"])], "momentum": 0.5, "muon_lr": 0.04},
                {"params": [(k, v) for k, v in named.items() if k != "up.weight"]}], lr=LR)
    assert [(g["momentum"], g["lr_ratio"]) for g in opt.param_groups] == [(0.5, 2.0), (0.95, 1.0), (0.95, 1.0)]


def test_huge_finite_gradient_gives_the_same_update() -> None:
    """Newton-Schulz sees g / ||g||: a finite gradient of 1e18 scale (its float32 sum of squares overflows)."""
    options = {"lr": LR, "ns_dtype": "float32"}
    normal, huge = one_step(options), one_step(options, grad_scale=1e18)
    for k in ("up.weight", "down.weight"):
        assert float(huge[k].norm()) > 0
        torch.testing.assert_close(huge[k], normal[k], rtol=1e-4, atol=1e-7)


def test_unnamed_parameters_warn_naming_the_fix() -> None:
    with pytest.warns(UserWarning, match=r"every 2-D tensor goes to Muon. Pass model.named_parameters\(\)"):
        Muon(model().parameters(), lr=LR)
    net = model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Muon(net.named_parameters(), lr=LR)
        for p in net.parameters():
            p.use_muon = p.ndim == 2
        Muon(net.parameters(), lr=LR)  # tagged by the user: nothing to warn about


def test_skipped_step_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    net = model()
    opt = Muon(net.named_parameters(), lr=LR)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    net["up"].weight.grad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="muon_ds.optim"):
        opt.step()
    assert opt.skipped_steps == 1
    assert "the step is skipped with momentum untouched (1 skipped so far)" in caplog.text
    net["up"].weight.grad[0, 0] = 1.0
    opt.step()
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), torch.finfo(torch.float32).max])
def test_only_a_non_finite_entry_skips_the_step(value: float) -> None:
    """The finite check sees one NaN or +-inf anywhere, and steps over the largest finite gradients
    (their float32 squares overflow)."""
    net = model()
    opt = Muon(net.named_parameters(), lr=LR)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    net["down"].weight.grad.fill_(value)
    net["down"].weight.grad[0, 0] = 1.0
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt.step()
    finite = value == value and abs(value) != float("inf")
    assert opt.skipped_steps == (0 if finite else 1)
    assert all(torch.equal(before[k], v) != finite for k, v in net.state_dict().items())


def test_same_tensor_twice_is_refused_at_construction() -> None:
    net = model()
    with pytest.raises(ValueError, match="parameter 'again' is the same tensor as 'up.weight'"):
        Muon([{"params": [("up.weight", net["up"].weight)]}, {"params": [("again", net["up"].weight)]}], lr=LR)


def stepped_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return copy.deepcopy(opt.state_dict())


def test_loading_another_optimizers_state_is_a_clear_error() -> None:
    net = model()
    state = stepped_state(net, torch.optim.AdamW(net.parameters()))
    with pytest.raises(ValueError, match="not saved by muon_ds's Muon .* another optimizer's, e.g. AdamW's"):
        Muon(model().named_parameters(), lr=LR).load_state_dict(state)


def test_loading_a_changed_models_state_says_what_differs() -> None:
    net = model()
    state = stepped_state(net, Muon(net.named_parameters(), lr=LR))
    wider = model()
    wider["up"] = nn.Linear(8, 21)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of up.weight has shape \(20, 8\), the parameter "
                                         r"\(21, 8\): it was saved for another model"):
        Muon(wider.named_parameters(), lr=LR).load_state_dict(state)
    deeper = model()
    deeper["mid"] = nn.Linear(8, 8, bias=False)
    with pytest.raises(ValueError, match=r"param group 0 \(Muon\) has 2 tensors in the optimizer state, 3 here"):
        Muon(deeper.named_parameters(), lr=LR).load_state_dict(state)


def test_resume_applies_the_configured_hyper_parameters(caplog: pytest.LogCaptureFixture) -> None:
    """Changed momentum / weight decay / scale on resume: the new values train, and the change is logged."""
    net = model()
    saved_weights = copy.deepcopy(net.state_dict())
    state = stepped_state(net, Muon(net.named_parameters(), lr=LR, weight_decay=WD))
    changed = {"lr": LR, "weight_decay": 0.2, "momentum": 0.5, "scale": "shape_scaling", "ns_dtype": "float32"}

    def resumed(checkpoint: dict) -> dict[str, torch.Tensor]:
        again = model()
        again.load_state_dict(saved_weights)
        opt = Muon(again.named_parameters(), **changed)
        opt.load_state_dict(copy.deepcopy(checkpoint))
        stepped_state(again, opt)
        return again.state_dict()

    with caplog.at_level(logging.WARNING, logger="muon_ds.optim"):
        got = resumed(state)
    assert "resuming with momentum=0.5 as configured; the checkpoint had 0.95" in caplog.text
    assert "resuming with scale='shape_scaling' as configured; the checkpoint had 'moonlight'" in caplog.text
    edited = copy.deepcopy(state)
    for group in edited["param_groups"]:  # the checkpoint as if saved with the new values
        group.update({k: v for k, v in changed.items() if k != "lr"})
    expected = resumed(edited)
    assert all(torch.equal(v, expected[k]) for k, v in got.items())


def test_frozen_matrices_never_change_when_distributed() -> None:
    """A replicated layout over a process group (ZeRO-0) must not treat a frozen matrix's missing
    gradient as zero (weight decay and momentum would then move it)."""
    from muon_ds.partition import replicated_layout

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for frozen_names in (["down"], ["up", "down"]):  # some, or all of the group's matrices
            net = model()
            for name in frozen_names:
                net[name].weight.requires_grad_(False)
            frozen = {name: net[name].weight.detach().clone() for name in frozen_names}
            opt = Muon(net.named_parameters(), lr=LR, weight_decay=WD)
            for group in opt.param_groups:
                if group["use_muon"]:
                    opt.set_layout(group, replicated_layout([opt.views[p] for p in group["params"]], 0, 1,
                                                            group["ns_steps"], dist.group.WORLD))
            for step in range(2):
                for k, p in net.named_parameters():
                    p.grad = gradients(step, net)[k].float() if p.requires_grad else None
                opt.step()
            assert all(torch.equal(net[name].weight, w) for name, w in frozen.items())
            assert not any(opt.state[net[name].weight] for name in frozen_names)
            assert not torch.equal(net["up"].bias, model()["up"].bias)  # AdamW trains on
            if "up" not in frozen_names:
                assert not torch.equal(net["up"].weight, model()["up"].weight)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", [float("nan"), torch.finfo(torch.float32).max])
def test_a_step_costs_one_agreement(value: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distributed, the finite check is one all_reduce whether the step trains, or is skipped, or its
    gradients' float32 squares overflow (the check used to need a second one for the last two)."""
    from muon_ds.partition import replicated_layout

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = model()
        opt = Muon(net.named_parameters(), lr=LR, weight_decay=WD)
        for group in opt.param_groups:
            if group["use_muon"]:
                opt.set_layout(group, replicated_layout([opt.views[p] for p in group["params"]], 0, 1,
                                                        group["ns_steps"], dist.group.WORLD))
        calls = []
        all_reduce = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or all_reduce(*a, **k))
        for poisoned in (False, True):
            for k, p in net.named_parameters():
                p.grad = gradients(0, net)[k].float()
            if poisoned:
                net["down"].weight.grad[0, 0] = value
            calls.clear()
            opt.step()
            assert len(calls) == 1
        assert opt.skipped_steps == (1 if value != value else 0)
    finally:
        dist.destroy_process_group()
