"""Newton-Schulz through ``torch.compile`` (the ``ns_compile`` option): the same math, fused kernels.

One compiled function per process, static shapes (``dynamic=False``): each distinct batch (N, A, B), dtype
and NS setting compiles once, then every step reuses it. Moonlight-16B has 10 matrix shapes, so one rank's
step has 10 to 20 distinct batches (local and received ones), more than torch._dynamo's default recompile
limit of 8, past which it would silently run the rest uncompiled: while this function runs, the limit is
raised to :data:`RECOMPILE_LIMIT`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from muon_ds.newton_schulz import newton_schulz_

RECOMPILE_LIMIT = 64  # distinct (N, A, B, dtype) batches compiled per process before falling back to eager


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    return torch.compile(newton_schulz_, dynamic=False)


def compiled_newton_schulz_(x: torch.Tensor, steps: int = 5, coefficient_set: str = "moonlight",
                            method: str = "direct") -> torch.Tensor:
    """:func:`muon_ds.newton_schulz.newton_schulz_`, compiled: same arguments, same in-place contract."""
    config = torch._dynamo.config
    limit = config.recompile_limit
    config.recompile_limit = max(RECOMPILE_LIMIT, limit)
    try:
        return _compiled()(x, steps, coefficient_set, method)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # no C++ compiler, no Triton, an inductor bug ...
        reason = str(err).strip().splitlines()[0]
        raise RuntimeError(f"ns_compile: torch.compile could not build Newton-Schulz for a {tuple(x.shape)} "
                           f"{x.dtype} batch on {x.device} ({reason}); set ns_compile to false to run it "
                           "eagerly") from err
    finally:
        config.recompile_limit = limit
