"""``ns_compile``: Newton-Schulz through torch.compile is the same Muon step, for every shape of a model."""

import pytest
import torch
from torch._dynamo.utils import counters

from muon_ds.compiled_ns import compiled_newton_schulz_
from muon_ds.newton_schulz import newton_schulz_
from muon_ds.optim import Muon
from tests.test_optim import LR, WD, model, reference_errors


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# measured 2026-12-01 on this 3-step run: float32 2.2e-6 eager and compiled; bf16 0.009-0.015 eager, 0.011-0.015
# compiled (inductor rounds fused bf16 elementwise work once, eager per op)
@pytest.mark.parametrize("ns_dtype,tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_compiled_step_equals_the_float64_reference(ns_dtype: str, tolerance: float) -> None:
    """About twice the eager step's own error; a compiled NS that were wrong (a missed step, a wrong
    transpose, an unnormalized input) would be off by O(1)."""
    net = model()
    muon = Muon(net.named_parameters(), lr=LR, weight_decay=WD, ns_dtype=ns_dtype, ns_compile=True)
    before = compiled_graphs()
    errors = reference_errors(net, muon, 3)
    assert compiled_graphs() - before == 2  # up (20, 8) and down (8, 20): each compiled once, then reused
    for k in ("up.weight", "down.weight"):
        assert errors[k] < tolerance, (k, errors[k])


def test_more_shapes_than_dynamos_default_limit_are_all_compiled() -> None:
    """torch._dynamo stops compiling a function after 8 shapes (Moonlight has 10) and runs it eagerly."""
    shapes = [(1, 6, 6 + i) for i in range(10)]
    before = compiled_graphs()
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        torch.testing.assert_close(compiled_newton_schulz_(x.clone()), newton_schulz_(x.clone()),
                                   rtol=1e-5, atol=1e-6)
    assert compiled_graphs() - before == len(shapes)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_ns_compile_must_be_a_boolean(value: object) -> None:
    with pytest.raises(ValueError, match="Muon optimizer params: ns_compile: Input should be a valid boolean"):
        Muon(model().named_parameters(), lr=LR, ns_compile=value)


def test_a_failed_compile_names_the_option() -> None:
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.raises(RuntimeError, match=r"ns_compile: torch.compile could not build Newton-Schulz for a "
                                               r"\(1, 5, 7\) torch.float32 batch on cpu .*set ns_compile to false"):
            compiled_newton_schulz_(torch.randn(1, 5, 7))
