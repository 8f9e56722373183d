"""Megatron's ``muon_*`` settings with Moonlight's defaults, and their mapping onto muon_ds's Muon.

Names and meanings are Megatron-LM core_v0.16.1's (megatron/training/arguments.py and megatron-core's
OptimizerConfig), so a script written for Megatron's Muon runs as is. Moonlight's defaults are
momentum 0.95 with Nesterov, update scale 0.2 x sqrt(max(A, B)) (Megatron's ``spectral`` mode times
an extra factor 0.2) and full-matrix Newton-Schulz under tensor parallelism; :data:`MOONLIGHT_DEFAULTS`
is their one definition, applied on the command line (:func:`apply_moonlight_defaults`: a flag
given always wins) and from Python (:func:`moonlight_optimizer_config`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from muon_ds.megatron.version import NESTEROV
from muon_ds.megatron.views import TP_MODES
from muon_ds.update import MOONLIGHT_RMS

# Megatron-LM's --muon-scale-mode -> (muon_ds's scale mode, the factor muon_ds's mode has over Megatron's).
# Megatron's "spectral" is sqrt(max(A, B)) = muon_ds's "moonlight" (0.2 sqrt(max(A, B))) / 0.2; its
# "shape_scaling", sqrt(max(1, A / B)), is muon_ds's "shape_scaling".
MEGATRON_SCALE_MODES = {"spectral": ("moonlight", MOONLIGHT_RMS), "shape_scaling": ("shape_scaling", 1.0)}
SCALE_MODES = (*MEGATRON_SCALE_MODES, "unit_rms_norm")
FP32_MATMUL_PRECISIONS = ("low", "medium", "high")

# attribute -> (Moonlight default, the command-line flags that set it explicitly)
MOONLIGHT_DEFAULTS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "muon_momentum": (0.95, ("--muon-momentum",)),
    NESTEROV.attribute: (True, (NESTEROV.on_flag, NESTEROV.off_flag)),
    "muon_split_qkv": (True, ("--muon-no-split-qkv",)),
    "muon_scale_mode": ("spectral", ("--muon-scale-mode",)),
    "muon_fp32_matmul_prec": ("medium", ("--muon-fp32-matmul-prec",)),
    "muon_num_ns_steps": (5, ("--muon-num-ns-steps",)),
    "muon_tp_mode": ("distributed", ("--muon-tp-mode",)),
    "muon_extra_scale_factor": (MOONLIGHT_RMS, ("--muon-extra-scale-factor",)),
}


def moonlight_optimizer_config(**overrides: Any) -> Any:
    """megatron-core's ``OptimizerConfig`` for ``--optimizer muon`` with Moonlight's Muon settings.

    The Python route (Megatron-Bridge / NeMo-style code) to what the command line gets: megatron-core's
    own dataclass defaults for ``muon_*`` are not Moonlight's (blockwise TP Newton-Schulz, 5x the
    update). Any OptimizerConfig field can be overridden, e.g.
    ``moonlight_optimizer_config(lr=2e-4, weight_decay=0.1, bf16=True, use_distributed_optimizer=True)``.
    """
    from megatron.core.optimizer import OptimizerConfig

    values = {"optimizer": "muon", **{attribute: value for attribute, (value, _) in MOONLIGHT_DEFAULTS.items()}}
    config = OptimizerConfig(**{**values, **overrides})
    MuonSettings.from_config(config)  # a bad override is named now, not at the first step
    return config


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register what Moonlight needs beyond Megatron's own ``--muon-*`` flags (usable as an extra_args_provider)."""
    group = parser.add_argument_group("muon_ds")
    group.add_argument(NESTEROV.off_flag, action="store_false", dest=NESTEROV.attribute,
                       help="muon_ds: plain momentum instead of Moonlight's Nesterov momentum")
    return parser


def explicit_flags(argv: Optional[Sequence[str]] = None) -> set[str]:
    """The ``--muon-*`` flags present on the command line (``--flag value`` or ``--flag=value``)."""
    argv = sys.argv[1:] if argv is None else argv
    return {token.split("=", 1)[0] for token in argv if token.startswith("--muon-")}


def apply_moonlight_defaults(args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Replace Megatron's Muon defaults by Moonlight's where the user gave no flag; validate; log once.

    With the distributed optimizer, checkpoints are also marked fully reshardable (``--dist-ckpt-optim-fully-
    reshardable``), which muon_ds's model-space optimizer state always is.
    """
    given = explicit_flags(argv)
    for attribute, (value, flags) in MOONLIGHT_DEFAULTS.items():
        if not given.intersection(flags):
            setattr(args, attribute, value)
    if getattr(args, "use_distributed_optimizer", False) and getattr(args, "non_persistent_ckpt_type", None) != "local":
        # muon_ds's distributed optimizer saves its state in model space whatever the sharding type asked for
        # (muon_ds.megatron.checkpoint): record it as what it is, so that Megatron-LM resumes at another TP/PP
        args.dist_ckpt_optim_fully_reshardable = True
    settings = MuonSettings.from_config(args)
    if getattr(args, "rank", 0) == 0:
        print(f"muon_ds: effective Muon settings: {settings.describe()}", flush=True)
    return args


@dataclass(frozen=True)
class MuonSettings:
    """The ``muon_*`` fields of an OptimizerConfig (or argparse Namespace), validated and mapped to muon_ds."""

    momentum: float
    nesterov: bool
    split_qkv: bool
    scale_mode: str
    fp32_matmul_prec: str
    ns_steps: int
    tp_mode: str
    extra_scale_factor: float

    @classmethod
    def from_config(cls, config: Any) -> "MuonSettings":
        """Read and check every ``muon_*`` value, naming the offending one."""
        values = {
            "momentum": getattr(config, "muon_momentum"),
            "nesterov": getattr(config, NESTEROV.attribute),
            "split_qkv": getattr(config, "muon_split_qkv"),
            "scale_mode": getattr(config, "muon_scale_mode"),
            "fp32_matmul_prec": getattr(config, "muon_fp32_matmul_prec"),
            "ns_steps": getattr(config, "muon_num_ns_steps"),
            "tp_mode": getattr(config, "muon_tp_mode"),
            "extra_scale_factor": getattr(config, "muon_extra_scale_factor"),
        }
        if not (isinstance(values["momentum"], (int, float)) and 0 <= values["momentum"] < 1):
            raise ValueError(f"muon_momentum (--muon-momentum) must be in [0, 1), got {values['momentum']!r}")
        if not (isinstance(values["ns_steps"], int) and values["ns_steps"] >= 1):
            raise ValueError("muon_num_ns_steps (--muon-num-ns-steps) must be an integer >= 1, "
                             f"got {values['ns_steps']!r}")
        for key, flag, choices in (("scale_mode", "--muon-scale-mode", SCALE_MODES),
                                   ("fp32_matmul_prec", "--muon-fp32-matmul-prec", FP32_MATMUL_PRECISIONS),
                                   ("tp_mode", "--muon-tp-mode", TP_MODES)):
            if values[key] not in choices:
                raise ValueError(f"muon_{key} ({flag}) must be one of {list(choices)}, got {values[key]!r}")
        if values["scale_mode"] == "unit_rms_norm":
            raise ValueError("muon_scale_mode (--muon-scale-mode) 'unit_rms_norm' is not supported by muon_ds; "
                             f"use 'spectral' (Moonlight, with --muon-extra-scale-factor {MOONLIGHT_RMS}) or "
                             "'shape_scaling'")
        factor = values["extra_scale_factor"]
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"muon_extra_scale_factor (--muon-extra-scale-factor) must be a positive number, "
                             f"got {factor!r}")
        return cls(**values)

    @property
    def core_scale(self) -> tuple[str, float]:
        """muon_ds's scale mode and the multiplier that give Megatron's ``scale_mode`` x ``extra_scale_factor``
        (see :data:`MEGATRON_SCALE_MODES`)."""
        mode, factor = MEGATRON_SCALE_MODES[self.scale_mode]
        return mode, self.extra_scale_factor / factor

    def off_moonlight(self, tp_size: int) -> list[str]:
        """Why these settings are not Moonlight's under TP size ``tp_size``: a layout-dependent update, another
        scale (empty: they are Moonlight's in these respects)."""
        problems = []
        if self.tp_mode == "blockwise" and tp_size > 1:
            problems.append(f"muon_tp_mode='blockwise' (--muon-tp-mode blockwise) orthogonalizes each of the "
                            f"{tp_size} tensor-parallel shards separately, so the update depends on the TP size; "
                            "Moonlight orthogonalizes whole matrices: muon_tp_mode='distributed'")
        if self.core_scale != ("moonlight", 1.0):
            problems.append(f"the update scale is {self.scale_mode} x {self.extra_scale_factor:g}, not Moonlight's "
                            f"0.2 sqrt(max(A, B)) (spectral x {MOONLIGHT_RMS}), so AdamW's lr does not carry over")
        return problems

    @property
    def ns_dtype(self) -> str:
        """Newton-Schulz precision: "high" is float32 matmuls, otherwise bfloat16 as Moonlight."""
        return "float32" if self.fp32_matmul_prec == "high" else "bfloat16"

    def describe(self) -> str:
        mode, multiplier = self.core_scale
        return (f"momentum={self.momentum} nesterov={self.nesterov} ns_steps={self.ns_steps} "
                f"ns_dtype={self.ns_dtype} scale={self.scale_mode}x{self.extra_scale_factor} "
                f"(muon_ds {mode} x {multiplier:g}) tp_mode={self.tp_mode} split_qkv={self.split_qkv}")
