"""Megatron-core adapter: ``get_megatron_optimizer`` building Moonlight's Muon (Muon + AdamW), ``--muon-*`` args.

Importing this package imports megatron-core (an optional dependency of muon_ds; 0.16.x or 0.19.x).
Megatron-LM, patched with patches/megatron-lm-core_v0.16.1-muon_ds.patch or
patches/megatron-lm-core_v0.19.0-muon_ds.patch, calls ``enabled()``, ``add_arguments``,
``apply_moonlight_defaults``, ``get_megatron_optimizer`` and (to build Moonlight) ``uses_moonlight`` /
``moonlight_builder`` (core_v0.16.1) or ``moonlight_model_config`` (core_v0.19.0) from here; Python code
builds its ``OptimizerConfig`` with ``moonlight_optimizer_config(**overrides)`` to get Moonlight's settings.
"""

import argparse
import os

from muon_ds.megatron import arguments, moonlight_provider
from muon_ds.megatron.arguments import MuonSettings, apply_moonlight_defaults, moonlight_optimizer_config
from muon_ds.megatron.moonlight_provider import moonlight_builder, moonlight_model_config, uses_moonlight
from muon_ds.megatron.optimizer import get_megatron_optimizer
from muon_ds.megatron.version import check_megatron_core


def enabled() -> bool:
    """Whether muon_ds provides Megatron-LM's ``--optimizer muon`` (opt out with MUON_DS_MEGATRON=0)."""
    return os.environ.get("MUON_DS_MEGATRON", "1") != "0"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """All of muon_ds's Megatron-LM flags: the ``--muon-*`` extra and ``--moonlight-spec`` / ``--moonlight-config``."""
    return moonlight_provider.add_arguments(arguments.add_arguments(parser))


__all__ = ["MuonSettings", "add_arguments", "apply_moonlight_defaults", "check_megatron_core", "enabled",
           "get_megatron_optimizer", "moonlight_builder", "moonlight_model_config", "moonlight_optimizer_config",
           "uses_moonlight"]
