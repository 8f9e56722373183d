"""``Muon``: Moonlight's Muon for hidden matrices and AdamW for the rest, as one torch optimizer.

Used as is in a single process. Engine adapters re-point it at the tensors the engine hands it
(ZeRO's flat partitions, Megatron's shards) by giving each Muon group a :class:`GroupLayout`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from muon_ds import pipeline
from muon_ds.compiled_ns import compiled_newton_schulz_
from muon_ds.matrices import ATTRIBUTE, Views, classify
from muon_ds.newton_schulz import newton_schulz_
from muon_ds.options import NS_DTYPES, MuonOptions
from muon_ds.partition import GroupLayout, replicated_layout
from muon_ds.pipeline import Hyper
from muon_ds.update import adamw_update, update_scale

logger = logging.getLogger(__name__)

ParamsArg = Union[Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]], Iterable[dict[str, Any]]]


class Muon(torch.optim.Optimizer):
    """Moonlight's Muon (arXiv 2502.16982) on hidden matrices, AdamW on everything else.

    ``params`` may be tensors, ``(name, tensor)`` pairs (names let the default rules send
    embeddings, the output head and routers to AdamW) or param-group dicts of either. Each group is
    split into a Muon half (``use_muon=True``) and an AdamW half; both use ``lr`` and
    ``weight_decay`` unless ``muon_lr`` / ``adam_lr`` override them. Options: :class:`MuonOptions`.
    """

    # Keys an engine's own utilities put in param groups besides Muon's options (DeepSpeed MoE's
    # split_params_into_different_moe_groups_for_optimizer); None: every other key is the engine's.
    ENGINE_GROUP_KEYS: Optional[frozenset[str]] = frozenset({"moe", "name"})

    def __init__(self, params: ParamsArg, **options: Any) -> None:
        self.options = MuonOptions.parse(options)
        self.views: dict[torch.Tensor, Views] = {}
        self.param_names: dict[torch.Tensor, str] = {}
        self.group_options: list[MuonOptions] = []  # by group id: what the constructor asked for
        self.skipped_steps = 0
        groups, unnamed = [], []
        for index, group in enumerate(_as_groups(params)):
            opts, extra = self._group_options(group, index)
            halves: dict[bool, list[torch.Tensor]] = {True: [], False: []}
            for position, item in enumerate(group["params"]):
                name, tensor = item if isinstance(item, tuple) else (f"group{index}.param{position}", item)
                if tensor in self.param_names:
                    raise ValueError(f"parameter {name!r} is the same tensor as {self.param_names[tensor]!r}: "
                                     "each tensor may appear once in a Muon optimizer")
                if not isinstance(item, tuple) and not _tagged(tensor):
                    unnamed.append(name)
                views = classify(name, tensor)
                self.param_names[tensor] = name
                if views is not None:
                    self.views[tensor] = views
                halves[views is not None].append(tensor)
            for use_muon in (True, False):
                if halves[use_muon]:
                    groups.append({**extra, **_hyper_parameters(opts, use_muon), "params": halves[use_muon],
                                   "use_muon": use_muon, "group_id": len(groups)})
                    self.group_options.append(opts)
        if unnamed:
            warnings.warn(f"Muon got {len(unnamed)} tensors without names (e.g. {unnamed[0]}): the rules that "
                          "send embeddings, the output head and routers to AdamW need names, so every 2-D "
                          "tensor goes to Muon. Pass model.named_parameters() (or tag tensors with "
                          "param.use_muon)", UserWarning, stacklevel=2)
        defaults = _hyper_parameters(self.options, False)
        defaults.update(use_muon=False)
        super().__init__(groups, defaults)
        self.layouts: dict[int, GroupLayout] = {}  # by group id: engines replace the group dicts
        self.sync_group: Optional[dist.ProcessGroup] = None
        self.distributed = False
        self.engine_checks_overflow = False  # the engine skips steps with non-finite gradients itself
        self.overflow = False  # the last step was skipped; DeepSpeed's engine reads this name (skipped_steps, lr)

    def _group_options(self, group: dict[str, Any], index: int) -> tuple[MuonOptions, dict[str, Any]]:
        """A group's options (the constructor's, overridden by the group's own keys), validated; and
        the engine's keys the group carries."""
        own = {k: v for k, v in group.items() if k in MuonOptions.model_fields}
        extra = {k: v for k, v in group.items() if k != "params" and k not in own}
        if self.ENGINE_GROUP_KEYS is not None:
            unknown = sorted(set(extra) - self.ENGINE_GROUP_KEYS)
            if unknown:
                raise ValueError(f"Muon param group {index}: unknown key(s) {unknown}; valid keys are "
                                 f"{sorted(MuonOptions.model_fields)}")
        options = {**self.options.model_dump(exclude_unset=True), **own}
        return MuonOptions.parse(options, where=f"Muon param group {index}"), extra

    def set_layout(self, group: dict[str, Any], layout: GroupLayout) -> None:
        """Engine adapters: the group's tensors hold these pieces; the plan says who holds the rest."""
        if len(layout.local) != len(group["params"]):
            raise ValueError("a Muon group layout needs one entry per tensor of the group")
        self.layouts[self._group_index(group)] = layout
        self.distributed = True

    @staticmethod
    def _group_index(group: dict[str, Any]) -> int:
        """The id given to a group at construction: it stays when engines narrow ``param_groups`` (ZeRO
        steps one group at a time), replace the group dicts or tensors (load_state_dict, shards), or
        leave a rank none of the group's tensors."""
        return group["group_id"]

    def counts(self) -> tuple[int, int]:
        """(matrices trained by Muon, tensors trained by AdamW), over the model's parameters."""
        muon = sum(len(views) for views in self.views.values())
        return muon, len(self.param_names) - len(self.views)

    def _layout(self, group: dict[str, Any]) -> GroupLayout:
        key = self._group_index(group)
        if key not in self.layouts:
            self.layouts[key] = replicated_layout([self.views[p] for p in group["params"]], 0, 1, group["ns_steps"])
        return self.layouts[key]

    def _frozen(self, tensor: torch.Tensor) -> bool:
        """A model parameter with requires_grad=False and no gradient never changes (the same on every
        rank; a gradient set by hand still trains it, as in torch). Tensors an engine put in its place
        (ZeRO's flat partitions, Megatron's shards) hold trainable parameters only."""
        return not tensor.requires_grad and tensor.grad is None and tensor in self.param_names

    def _grads_finite(self) -> bool:
        return self.grads_finite([p.grad for group in self.param_groups for p in group["params"]])

    def grads_finite(self, grads: list[Optional[torch.Tensor]]) -> bool:
        """Every entry of ``grads`` (None: no gradient) finite, agreed across ranks when distributed (else
        every rank skips).

        One fused pass per device, exact (torch's GradScaler check, scaling by 1: the gradients keep their
        values), and one agreement: a skipped step costs no more than one that trains."""
        grads = [grad for grad in grads if grad is not None]
        flags = []  # one per device, the first gradient's first (the agreement runs there)
        for device in dict.fromkeys(grad.device for grad in grads):
            flags.append(torch.zeros(1, device=device))
            torch._amp_foreach_non_finite_check_and_unscale_([g for g in grads if g.device == device], flags[-1],
                                                             torch.ones(1, device=device))
        if not flags:  # a rank holding no gradient agrees on its layouts' device (NCCL needs GPU tensors)
            flags.append(torch.zeros(1, device=next((layout.device for layout in self.layouts.values()
                                                     if layout.device is not None), "cpu")))
        return self._agreed(sum(flag.to(flags[0].device) for flag in flags) == 0)

    def _agreed(self, finite: torch.Tensor) -> bool:
        """``finite`` on every rank when distributed (one all_reduce, on ``finite``'s device), as a bool (one
        host sync)."""
        if self.distributed and dist.is_initialized():
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.sync_group)
            finite = flag > 0
        return bool(finite)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One step; skipped entirely (momentum untouched) when any gradient is not finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.overflow = not self.engine_checks_overflow and not self._grads_finite()
        if self.overflow:
            self.skipped_steps += 1
            logger.warning("muon_ds: a gradient is not finite, the step is skipped with momentum untouched "
                           "(%d skipped so far)", self.skipped_steps)
            return loss
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr = group["lr"] * group["lr_ratio"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), lr,
                         group["betas"], group["eps"], group["weight_decay"])

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Follow the layout's route through the pipeline (muon_ds/pipeline.py)."""
        layout = self._layout(group)
        if not layout.plan.matrices:  # no rank has any of this group's matrices: nothing to exchange
            return
        dtype = NS_DTYPES[group["ns_dtype"]]
        tensors = group["params"]
        device = tensors[0].device if tensors else layout.device
        # Left out (None): frozen matrices (the same on every rank), and in one process those without a
        # gradient. Distributed, a tensor without a gradient still joins the exchange, with zeros.
        params, grads, momenta, left_out = [], [], [], []
        for index, p in enumerate(tensors):
            grad = p.grad
            if (grad is None and not self.distributed) or self._frozen(p):
                params.append(None)
                grads.append(None)
                momenta.append(None)
                left_out.append(index)
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            params.append(p)
            grads.append(torch.zeros_like(p) if grad is None else grad)
            momenta.append(state["momentum_buffer"])
        if len(left_out) == len(tensors) and not self.distributed:
            return
        skip = frozenset(piece.key for index in left_out for piece, _offset in layout.local[index])
        route = layout.route(skip, dtype, device, tuple(p.shape for p in tensors))
        shapes = {}

        def scale(shape: tuple[int, int]) -> float:
            if shape not in shapes:
                shapes[shape] = update_scale(shape, group["scale"]) * group["extra_scale"]
            return shapes[shape]

        hyper = Hyper(group["lr"] * group["lr_ratio"], group["weight_decay"], group["momentum"], group["nesterov"],
                      scale)
        steps, coefficients, method = group["ns_steps"], group["ns_coefficients"], group["ns_method"]
        compiled = group["ns_compile"]
        pipeline.run(route, params, grads, momenta, hyper,
                     lambda batch: orthogonalize(batch, steps=steps, coefficient_set=coefficients, method=method,
                                                 compiled=compiled),
                     dtype, device, layout.process_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load momentum and AdamW moments; the hyper-parameters are the constructor's (logged where the
        checkpoint's differ), except ``lr``, which a scheduler owns and the checkpoint carries.

        State that does not fit this optimizer (another optimizer's, another model's, another
        partitioning's) is refused, saying what differs.
        """
        self._check_fits(state_dict)
        super().load_state_dict(state_dict)
        changed: dict[str, tuple[Any, Any]] = {}
        for group in self.param_groups:
            wanted = _hyper_parameters(self.group_options[self._group_index(group)], group["use_muon"])
            for key, value in wanted.items():
                if key != "lr" and _plain(group.get(key)) != _plain(value):
                    changed.setdefault(key, (_plain(group.get(key)), _plain(value)))
                    group[key] = value
        for key, (saved, value) in changed.items():
            logger.warning("muon_ds: resuming with %s=%r as configured; the checkpoint had %r", key, value, saved)

    def _check_fits(self, state_dict: dict[str, Any]) -> None:
        saved, groups = state_dict["param_groups"], self.param_groups
        if any("use_muon" not in g for g in saved):
            raise ValueError("this optimizer state was not saved by muon_ds's Muon (its param groups have no "
                             "'use_muon' key: another optimizer's, e.g. AdamW's): it has no Muon momentum. Load "
                             "only the model weights and start the optimizer fresh")
        if [g["use_muon"] for g in saved] != [g["use_muon"] for g in groups]:
            raise ValueError(f"the optimizer state has param groups {_sides(saved)}, this optimizer "
                             f"{_sides(groups)}: it was saved for another model or parameter grouping")
        for index, (old, new) in enumerate(zip(saved, groups)):
            if len(old["params"]) != len(new["params"]):
                raise ValueError(f"param group {index} ({_sides([new])[0]}) has {len(old['params'])} tensors in the "
                                 f"optimizer state, {len(new['params'])} here: it was saved for another model")
            for saved_id, tensor in zip(old["params"], new["params"]):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if torch.is_tensor(value) and value.dim() and value.shape != tensor.shape:
                        self._refuse_shape(tensor, key, value)

    def _refuse_shape(self, tensor: torch.Tensor, key: str, value: torch.Tensor) -> None:
        if tensor in self.param_names:
            raise ValueError(f"optimizer state {key!r} of {self.param_names[tensor]} has shape "
                             f"{tuple(value.shape)}, the parameter {tuple(tensor.shape)}: it was saved for "
                             "another model")
        raise ValueError(f"optimizer state {key!r} of a flat tensor of {tensor.numel()} elements has shape "
                         f"{tuple(value.shape)}: it was saved for another model or another partitioning "
                         "(data-parallel world size)")


def _sides(groups: list[dict[str, Any]]) -> list[str]:
    return ["Muon" if g["use_muon"] else "AdamW" for g in groups]


def _plain(value: Any) -> Any:
    """Tuples come back from a checkpoint as lists: compare and print them alike."""
    return list(value) if isinstance(value, tuple) else value


def orthogonalize(batch: torch.Tensor, steps: int, coefficient_set: str = "moonlight",
                  method: str = "direct", compiled: bool = False) -> torch.Tensor:
    """The step's Newton-Schulz of one (N, A, B) NS-dtype batch, in place, through torch.compile when
    ``compiled`` (a module-level name, so that benchmarks can time it)."""
    return (compiled_newton_schulz_ if compiled else newton_schulz_)(batch, steps, coefficient_set, method)


def _hyper_parameters(options: MuonOptions, use_muon: bool) -> dict[str, Any]:
    """The group keys the step reads; the side's lr override becomes ``lr_ratio``."""
    values = options.model_dump(exclude={"muon_lr", "adam_lr"})
    values["lr_ratio"] = options.lr_ratio(use_muon)
    return values


def _tagged(tensor: torch.Tensor) -> bool:
    """Classified by the user, not by name rules."""
    return hasattr(tensor, ATTRIBUTE) or hasattr(tensor, "use_muon")


def _as_groups(params: ParamsArg) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("Muon got an empty parameter list")
    if isinstance(items[0], dict):
        return [dict(group, params=list(group["params"])) for group in items]
    return [{"params": items}]
