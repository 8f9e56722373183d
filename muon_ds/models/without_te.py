"""megatron-core without TransformerEngine: two of its modules misjudge TE's absence.

- ``multi_latent_attention`` imports megatron's stand-in TE classes (``megatron.core.extensions``
  defines mocks when TE is missing), so it believes TE is there and every MLA fails to build on
  ``isinstance(linear_proj, <mock>)``;
- ``moe_utils`` leaves ``te_general_gemm`` undefined, so the router's fp32 path (Moonlight's
  ``moe_router_dtype``) raises NameError.

:func:`apply` sets both to what a TE-less install means (idempotent); with TE installed it does nothing.
"""

from __future__ import annotations

import importlib.util

__all__ = ["apply"]


def apply() -> None:
    """Correct megatron-core's view of TransformerEngine's absence (see the module doc)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        return
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
