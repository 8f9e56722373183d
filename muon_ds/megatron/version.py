"""Everything that differs between the megatron-core releases muon_ds is tested with (0.16.x and 0.19.x).

The adapter reaches into megatron-core's optimizer wrappers, MLA layers and argument names; the few
places where 0.16 and 0.19 differ are answered here. The one model difference (0.19 fuses a Q norm into MLA's
``linear_q_proj``) needs no branch: muon_ds's MLA layer overrides the resolution hook only 0.19 calls
(``muon_ds.models.local_layers.MoonlightMLASelfAttention._resolve_qk_norm_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from packaging.version import Version

import muon_ds

TESTED_MEGATRON_CORE = ((Version("0.16.0"), Version("0.17.0")), (Version("0.19.0"), Version("0.20.0")))  # [low, high)


def megatron_core_version() -> Version:
    """The installed megatron-core's release (local build tags such as ``+abc`` dropped)."""
    import megatron.core

    return Version(megatron.core.__version__.split("+")[0])


def check_megatron_core(version: Optional[str] = None) -> None:
    """Refuse a megatron-core outside the tested releases, naming them."""
    found = Version(version.split("+")[0]) if version is not None else megatron_core_version()
    if not any(low <= found < high for low, high in TESTED_MEGATRON_CORE):
        ranges = " or ".join(f">={low},<{high}" for low, high in TESTED_MEGATRON_CORE)
        raise RuntimeError(f"muon_ds {muon_ds.__version__} supports megatron-core {ranges}; "
                           f"found megatron-core {version or found}")


@dataclass(frozen=True)
class Switch:
    """A boolean ``--muon-*`` option: its OptimizerConfig / argparse attribute, Megatron-LM's flag that turns it
    on, and the flag muon_ds adds to turn it off (Moonlight's default is on)."""

    attribute: str
    on_flag: str
    off_flag: str


def _nesterov() -> Switch:
    """Megatron's Nesterov option: ``muon_use_nesterov`` in 0.16, renamed ``muon_nesterov`` in 0.19."""
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    if "muon_nesterov" in {f.name for f in dataclasses.fields(OptimizerConfig)}:
        return Switch("muon_nesterov", "--muon-nesterov", "--muon-no-nesterov")
    return Switch("muon_use_nesterov", "--muon-use-nesterov", "--muon-no-use-nesterov")


NESTEROV = _nesterov()


def unsupported_settings(config: object) -> dict[str, bool]:
    """OptimizerConfig settings that only 0.19 has and muon_ds's Muon cannot honour (name -> set?)."""
    return {
        "use_layer_wise_distributed_optimizer": bool(getattr(config, "use_layer_wise_distributed_optimizer", False)),
        "optimizer_cuda_graph": bool(getattr(config, "optimizer_cuda_graph", False)),
        f"muon_coefficient_type={getattr(config, 'muon_coefficient_type', 'quintic')!r} (muon_ds runs Moonlight's "
        "quintic Newton-Schulz)": getattr(config, "muon_coefficient_type", "quintic") != "quintic",
        f"muon_scalar_optimizer={getattr(config, 'muon_scalar_optimizer', 'adam')!r} (muon_ds trains non-matrix "
        "parameters with AdamW)": getattr(config, "muon_scalar_optimizer", "adam") != "adam",
    }


def training_optimizer_factory(training: object) -> str:
    """The name under which Megatron-LM's ``megatron.training.training`` builds the ``--optimizer muon`` optimizer.

    core_v0.16.1 calls ``get_megatron_muon_optimizer`` for Muon; core_v0.19.0 calls megatron-core's
    ``get_megatron_optimizer`` for every optimizer (which sends Muon to megatron-core's native one).
    """
    return "get_megatron_muon_optimizer" if hasattr(training, "get_megatron_muon_optimizer") else \
        "get_megatron_optimizer"


def builds_gpt_from_model_config(argument_utils: object) -> bool:
    """Whether Megatron-LM's pretrain_gpt.py builds the model from ``argument_utils.gpt_config_from_args(args)``
    (a GPTModelConfig, core_v0.19.0) rather than through ``gpt_builders.gpt_builder`` (core_v0.16.1)."""
    return hasattr(argument_utils, "gpt_config_from_args")
