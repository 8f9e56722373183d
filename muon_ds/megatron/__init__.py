"""Megatron-core adapter: ``get_megatron_optimizer`` building Moonlight's Muon (Muon + AdamW), ``--muon-*`` args.

Importing this package imports megatron-core (an optional dependency of muon_ds). Megatron-LM,
patched with patches/megatron-lm-core_v0.16.1-muon_ds.patch, calls ``enabled()``,
``add_arguments``, ``apply_moonlight_defaults`` and ``get_megatron_optimizer`` from here; Python code
builds its ``OptimizerConfig`` with ``moonlight_optimizer_config(**overrides)`` to get Moonlight's settings.
"""

import os

from muon_ds.megatron.arguments import MuonSettings, add_arguments, apply_moonlight_defaults, moonlight_optimizer_config
from muon_ds.megatron.optimizer import get_megatron_optimizer
from muon_ds.megatron.version import check_megatron_core


def enabled() -> bool:
    """Whether muon_ds provides Megatron-LM's ``--optimizer muon`` (opt out with MUON_DS_MEGATRON=0)."""
    return os.environ.get("MUON_DS_MEGATRON", "1") != "0"


__all__ = ["MuonSettings", "add_arguments", "apply_moonlight_defaults", "check_megatron_core", "enabled",
           "get_megatron_optimizer", "moonlight_optimizer_config"]
