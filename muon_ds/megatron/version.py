"""The megatron-core releases this adapter is tested with: it reaches into their optimizer wrappers."""

from __future__ import annotations

from typing import Optional

from packaging.version import Version

import muon_ds

TESTED_MEGATRON_CORE = (Version("0.16.0"), Version("0.17.0"))  # [low, high)


def check_megatron_core(version: Optional[str] = None) -> None:
    """Refuse a megatron-core outside the tested range, naming both."""
    if version is None:
        import megatron.core

        version = megatron.core.__version__
    low, high = TESTED_MEGATRON_CORE
    if not low <= Version(version.split("+")[0]) < high:
        raise RuntimeError(f"muon_ds {muon_ds.__version__} supports megatron-core >={low},<{high}; "
                           f"found megatron-core {version}")
