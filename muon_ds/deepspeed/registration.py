"""Make ``"optimizer": {"type": "Muon"}`` build muon_ds's Muon, replacing DeepSpeed's built-in one."""

from __future__ import annotations

import functools
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero import utils as zero_utils
from deepspeed.utils.logging import print_dist
from packaging.version import Version

import muon_ds
from muon_ds.optim import Muon

TESTED_DEEPSPEED = (Version("0.19.0"), Version("0.20.0"))  # [low, high)
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


def check_engine(engine: DeepSpeedEngine) -> None:
    """Refuse what Muon cannot do correctly here, naming the setting."""
    version = Version(deepspeed.__version__.split("+")[0])
    low, high = TESTED_DEEPSPEED
    if not low <= version < high:
        raise RuntimeError(f"muon_ds {muon_ds.__version__} is tested with deepspeed >={low},<{high}; "
                           f"found deepspeed {deepspeed.__version__}")
    section = engine._config._param_dict.get("optimizer", {})  # DeepSpeed reads only the keys it knows
    unknown = sorted(set(section) - {"type", "params"})
    if isinstance(section, dict) and str(section.get("type", "")).lower() == "muon" and unknown:
        raise ValueError(f"optimizer section: unknown key(s) {unknown} beside 'type' and 'params' (the Muon "
                         "options go in 'params')")
    stage = engine.zero_optimization_stage()
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"zero_optimization.stage={stage} is not supported by the Muon optimizer; "
                         f"use one of {list(SUPPORTED_ZERO_STAGES)}")
    if stage == 3 and engine.has_moe_layers:
        raise ValueError("zero_optimization.stage=3 with MoE layers is not supported by the Muon optimizer "
                         "(DeepSpeed 0.19 runs native deepspeed.moe layers only at ZeRO stage 0-2); use stage "
                         "1 or 2")
    if engine.zero_elastic_checkpoint():
        raise ValueError("zero_optimization.elastic_checkpoint=true is not supported by the Muon optimizer: "
                         "DeepSpeed's elastic loader assumes every param group has Adam's state keys. Resume "
                         "at the same data-parallel world size")
    if engine.zero_cpu_offload() or engine.zero_offload_param() is not None:
        raise ValueError("zero_optimization.offload_optimizer / offload_param are not supported by the Muon "
                         "optimizer; remove them")


def _named(engine: DeepSpeedEngine, params: Any) -> list[dict[str, Any]]:
    """The engine's param groups with each tensor paired with its module name (for the default rules)."""
    groups = list(params)
    if not groups or not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [dict(group, params=[(engine.param_names[p], p) for p in group["params"]]) for group in groups]


def build_muon(engine: DeepSpeedEngine, model_parameters: Any) -> Muon:
    groups = _named(engine, model_parameters)
    optimizer = Muon(groups, **(engine.optimizer_params() or {}))
    for group in groups:
        for _name, param in group["params"]:
            # DeepSpeed's ZeRO runs its own Muon on tensors tagged use_muon: the tag is now ours.
            if hasattr(param, "use_muon"):
                del param.use_muon
    return optimizer


def describe(engine: DeepSpeedEngine, optimizer: Muon) -> str:
    muon, adamw = optimizer.counts()
    opts = optimizer.options
    return (f"muon_ds {muon_ds.__version__}: Moonlight Muon (scale={opts.scale}, ns_dtype={opts.ns_dtype}, "
            f"ns_steps={opts.ns_steps}) under ZeRO stage {engine.zero_optimization_stage()} "
            f"[{type(engine.optimizer).__name__}]: {muon} matrices -> Muon, {adamw} tensors -> AdamW")


def register() -> None:
    """Patch DeepSpeed once: build our Muon for the name 'muon', then lay it out for the wrapper."""
    if getattr(DeepSpeedEngine, "_muon_ds_registered", False):
        return
    build_basic = DeepSpeedEngine._configure_basic_optimizer
    configure = DeepSpeedEngine._configure_optimizer

    def _configure_basic_optimizer(self: DeepSpeedEngine, model_parameters: Any) -> torch.optim.Optimizer:
        if self.optimizer_name() == "muon":
            return build_muon(self, model_parameters)
        return build_basic(self, model_parameters)

    def _configure_optimizer(self: DeepSpeedEngine, client_optimizer: Any, model_parameters: Any) -> None:
        # Before anything is built, for a config's "type": "Muon" and a Muon passed to initialize alike.
        if isinstance(client_optimizer, Muon) or (client_optimizer is None and self.optimizer_name() == "muon"):
            check_engine(self)
        configure(self, client_optimizer, model_parameters)
        if isinstance(self.basic_optimizer, Muon):
            from muon_ds.deepspeed.layouts import attach_layouts

            attach_layouts(self.optimizer, self.basic_optimizer)
            if self.zero_optimization_stage() == 3:
                from muon_ds.deepspeed.universal import load_stage3

                # DeepSpeed's ZeRO-3 universal loader knows only Adam's state: ours, for load_universal.
                self.optimizer.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = functools.partial(
                    load_stage3, self.optimizer)
            print_dist(describe(self, self.basic_optimizer), ranks=[0])

    def set_optimizer_flags(config: Any, model: torch.nn.Module) -> None:
        # DeepSpeed's version overwrites every parameter's use_muon tag with its own rule; ours reads
        # the user's tags (and its own rules) instead.
        if config.optimizer_name != "muon":
            tag_parameters(config, model)

    def initialize_optimizer_states(self: FP16_UnfusedOptimizer) -> None:
        # DeepSpeed primes optimizer state with a zero-gradient step on its fp32 copies; on Muon that step
        # would decay the weights and count an AdamW step. Muon creates its state at the first real step.
        if not isinstance(self.optimizer, Muon):
            prime_states(self)

    prime_states = FP16_UnfusedOptimizer.initialize_optimizer_states
    FP16_UnfusedOptimizer.initialize_optimizer_states = initialize_optimizer_states
    tag_parameters = deepspeed.set_optimizer_flags
    deepspeed.set_optimizer_flags = set_optimizer_flags
    DeepSpeedEngine._configure_basic_optimizer = _configure_basic_optimizer
    DeepSpeedEngine._configure_optimizer = _configure_optimizer
    if Muon not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(Muon)
    DeepSpeedEngine._muon_ds_registered = True
