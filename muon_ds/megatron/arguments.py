"""Megatron-LM's ``--muon-*`` arguments with Moonlight's defaults, and their mapping onto muon_ds's Muon.

Names and meanings are Megatron-LM core_v0.16.1's (megatron/training/arguments.py), so a script
written for Megatron's Muon runs as is. When muon_ds provides ``--optimizer muon`` the defaults
are Moonlight's: momentum 0.95 with Nesterov, update scale 0.2 x sqrt(max(A, B)) (Megatron's
``spectral`` mode times an extra factor 0.2) and full-matrix Newton-Schulz under tensor
parallelism. A flag given on the command line always wins.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from muon_ds.megatron.version import NESTEROV
from muon_ds.megatron.views import TP_MODES

SCALE_MODES = ("spectral", "shape_scaling", "unit_rms_norm")
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
    "muon_extra_scale_factor": (0.2, ("--muon-extra-scale-factor",)),
}


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
    """Replace Megatron's Muon defaults by Moonlight's where the user gave no flag; validate; log once."""
    given = explicit_flags(argv)
    for attribute, (value, flags) in MOONLIGHT_DEFAULTS.items():
        if not given.intersection(flags):
            setattr(args, attribute, value)
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
                             "use 'spectral' (Moonlight, with --muon-extra-scale-factor 0.2) or 'shape_scaling'")
        factor = values["extra_scale_factor"]
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"muon_extra_scale_factor (--muon-extra-scale-factor) must be a positive number, "
                             f"got {factor!r}")
        return cls(**values)

    @property
    def core_scale(self) -> tuple[str, float]:
        """muon_ds's scale mode and the multiplier that give Megatron's ``scale_mode`` x ``extra_scale_factor``.

        Megatron's spectral is sqrt(max(A, B)), which is muon_ds's "moonlight" (0.2 sqrt(max(A, B))) / 0.2;
        its shape_scaling, sqrt(max(1, A / B)), is muon_ds's "spectral".
        """
        if self.scale_mode == "spectral":
            return "moonlight", self.extra_scale_factor / 0.2
        return "spectral", float(self.extra_scale_factor)

    @property
    def ns_dtype(self) -> str:
        """Newton-Schulz precision: "high" is float32 matmuls, otherwise bfloat16 as Moonlight."""
        return "float32" if self.fp32_matmul_prec == "high" else "bfloat16"

    def describe(self) -> str:
        mode, multiplier = self.core_scale
        return (f"momentum={self.momentum} nesterov={self.nesterov} ns_steps={self.ns_steps} "
                f"ns_dtype={self.ns_dtype} scale={self.scale_mode}x{self.extra_scale_factor} "
                f"(muon_ds {mode} x {multiplier:g}) tp_mode={self.tp_mode} split_qkv={self.split_qkv}")
