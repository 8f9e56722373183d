"""``Muon``: Moonlight's Muon for hidden matrices and AdamW for the rest, as one torch optimizer.

Used as is in a single process. Engine adapters re-point it at the tensors the engine hands it
(ZeRO's flat partitions, Megatron's shards) by giving each Muon group a :class:`GroupLayout`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from muon_ds.exchange import gather_owned, scatter_updates
from muon_ds.matrices import Views, classify
from muon_ds.newton_schulz import orthogonalize
from muon_ds.options import NS_DTYPES, MuonOptions
from muon_ds.partition import GroupLayout, replicated_layout
from muon_ds.plan import Piece
from muon_ds.update import adamw_update, decay_weights, muon_momentum, update_scale

ParamsArg = Union[Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]], Iterable[dict[str, Any]]]


class Muon(torch.optim.Optimizer):
    """Moonlight's Muon (arXiv 2502.16982) on hidden matrices, AdamW on everything else.

    ``params`` may be tensors, ``(name, tensor)`` pairs (names let the default rules send
    embeddings, the output head and routers to AdamW) or param-group dicts of either. Each group is
    split into a Muon half (``use_muon=True``) and an AdamW half; both use ``lr`` and
    ``weight_decay`` unless ``muon_lr`` / ``adam_lr`` override them. Options: :class:`MuonOptions`.
    """

    def __init__(self, params: ParamsArg, **options: Any) -> None:
        self.options = MuonOptions.parse(options)
        self.views: dict[torch.Tensor, Views] = {}
        self.param_names: dict[torch.Tensor, str] = {}
        groups = []
        for index, group in enumerate(_as_groups(params)):
            extra = {k: v for k, v in group.items() if k != "params"}
            halves: dict[bool, list[torch.Tensor]] = {True: [], False: []}
            for position, item in enumerate(group["params"]):
                name, tensor = item if isinstance(item, tuple) else (f"group{index}.param{position}", item)
                views = classify(name, tensor)
                self.param_names[tensor] = name
                if views is not None:
                    self.views[tensor] = views
                halves[views is not None].append(tensor)
            for use_muon in (True, False):
                if halves[use_muon]:
                    groups.append({**extra, "params": halves[use_muon], "use_muon": use_muon,
                                   "lr_ratio": self.options.lr_ratio(use_muon), "group_id": len(groups)})
        defaults = self.options.model_dump(exclude={"muon_lr", "adam_lr"})
        defaults.update(lr_ratio=1.0, use_muon=False)
        super().__init__(groups, defaults)
        self.layouts: dict[int, GroupLayout] = {}  # by group id: engines replace the group dicts
        self.sync_group: Optional[dist.ProcessGroup] = None
        self.distributed = False
        self.overflow = False  # the last step was skipped; DeepSpeed's engine reads this name (skipped_steps, lr)

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

    def _grads_finite(self) -> bool:
        """All gradients finite, agreed across ranks when distributed (else every rank skips)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        if self.distributed and dist.is_initialized():
            # On the gradients' device (or the layout's, for a rank holding none): NCCL needs GPU tensors.
            device = grads[0].device if grads else next(
                (layout.device for layout in self.layouts.values() if layout.device is not None), finite.device)
            flag = finite.to(device, torch.float32)
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
        self.overflow = not self._grads_finite()
        if self.overflow:
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
        layout = self._layout(group)
        dtype = NS_DTYPES[group["ns_dtype"]]
        device = group["params"][0].device if group["params"] else layout.device
        to_orthogonalize: dict[Piece, torch.Tensor] = {}
        updated = []
        for p, pieces in zip(group["params"], layout.local):
            if p.grad is None and not self.distributed:
                continue
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            u = muon_momentum(grad, state["momentum_buffer"], group["momentum"], group["nesterov"]).reshape(-1)
            for piece, offset in pieces:
                to_orthogonalize[piece] = u[offset:offset + piece.numel].to(dtype)
            updated.append((p, pieces))
        if not updated and not self.distributed:
            return
        plan = layout.plan
        present = None if self.distributed else {piece.key for piece in to_orthogonalize}
        full = gather_owned(plan, layout.rank, to_orthogonalize, layout.process_group, dtype, device, present)
        by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key in full:
            by_shape[plan.matrices[key].shape].append(key)
        directions = {}
        for shape, keys in by_shape.items():
            stacked = orthogonalize(torch.stack([full[k] for k in keys]), group["ns_steps"], dtype)
            directions.update(zip(keys, stacked.unbind(0)))
        wanted = [piece for _p, pieces in updated for piece, _offset in pieces]
        local = scatter_updates(plan, layout.rank, directions, wanted, layout.process_group, dtype, device)
        lr = group["lr"] * group["lr_ratio"]
        for p, pieces in updated:
            decay_weights(p, lr, group["weight_decay"])
            flat = p.view(-1)
            for piece, offset in pieces:
                scale = update_scale(plan.matrices[piece.key].shape, group["scale"])
                scale *= group.get("scale_multiplier", 1.0)  # engines' extra factor (Megatron's extra_scale_factor)
                flat[offset:offset + piece.numel].add_(local[piece].to(p.dtype), alpha=-lr * scale)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses state whose tensors do not fit this optimizer's (e.g. saved at another ZeRO world size)."""
        groups = self.param_groups
        ids = [p for g in state_dict["param_groups"] for p in g["params"]]
        tensors = [p for g in groups for p in g["params"]]
        if len(ids) != len(tensors):
            raise ValueError(f"optimizer state has {len(ids)} tensors, this optimizer {len(tensors)}: "
                             "it was saved for another model or parameter grouping")
        for saved_id, tensor in zip(ids, tensors):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != tensor.shape:
                    name = self.param_names.get(tensor, f"flat tensor of {tensor.numel()} elements")
                    raise ValueError(f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, the "
                                     f"tensor {tuple(tensor.shape)}: saved under a different partitioning "
                                     "(data-parallel world size); resume at the same world size")
        super().load_state_dict(state_dict)


def _as_groups(params: ParamsArg) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("Muon got an empty parameter list")
    if isinstance(items[0], dict):
        return [dict(group, params=list(group["params"])) for group in items]
    return [{"params": items}]
