"""One finite-gradient agreement per step for the members of megatron-core's ChainedOptimizer.

With a loss scaler (fp16) megatron-core checks the gradients itself and agrees on it; without one (bf16,
fp32) nothing does, and a Muon per member (dense and expert) would each check and agree. Instead the last
member without a scaler checks every such member's gradients in its ``prepare_grads``: ChainedOptimizer
prepares all members before stepping any and skips the whole step when one reports non-finite gradients
(Megatron-LM then counts it as skipped), so one fused pass and one agreement decide for all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class ChecksFiniteGradients:
    """Mixin for megatron-core's optimizer wrappers around muon_ds's Muon: ``prepare_grads`` also reports
    non-finite gradients found by :attr:`finite_check` (set on one member by :func:`install`)."""

    finite_check: Optional[Callable[[], bool]] = None  # True when every gradient it covers is finite

    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()  # type: ignore[misc]
        return found_inf or (self.finite_check is not None and not self.finite_check())


def install(members: list[Any]) -> None:
    """Check the gradients of every member that has a Muon and no loss scaler, once per step, in the last
    of them (its gradients are prepared last). Muon itself then never checks: megatron-core skips."""
    unchecked = [m for m in members if m.optimizer is not None and getattr(m, "grad_scaler", None) is None]
    for member in members:
        if member.optimizer is not None:
            member.optimizer.engine_checks_overflow = True
    if not unchecked:
        return
    muons = [m.optimizer for m in unchecked]
    if len({id(muon.sync_group) for muon in muons}) != 1:
        raise RuntimeError("muon_ds: the chained Muon optimizers agree over different process groups")

    def all_finite() -> bool:
        return muons[-1].grads_finite([p.grad for muon in muons for group in muon.param_groups
                                       for p in group["params"]])

    unchecked[-1].finite_check = all_finite
