"""Options: every bad key or value is an error that names it."""

import pytest

from muon_ds.options import MuonOptions


def test_defaults_are_moonlights() -> None:
    opts = MuonOptions.parse({})
    assert (opts.momentum, opts.nesterov, opts.ns_steps, opts.scale, opts.ns_dtype) == (
        0.95, True, 5, "moonlight", "bfloat16")


def test_unknown_key_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['nesterow'\]; valid keys are \['adam_lr', "):
        MuonOptions.parse({"lr": 1e-3, "nesterow": True})


@pytest.mark.parametrize("key,value", [("lr", -1.0), ("momentum", 1.0), ("ns_steps", 0), ("eps", 0.0),
                                       ("betas", [0.9, 1.0]), ("scale", "rms"), ("ns_dtype", "float16"),
                                       ("weight_decay", -0.1), ("muon_lr", -2.0), ("lr", float("inf")),
                                       ("lr", True), ("eps", float("inf")), ("eps", True), ("ns_steps", True),
                                       ("extra_scale", 0.0), ("nesterov", "yes")])
def test_invalid_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Muon optimizer params: {key}"):
        MuonOptions.parse({key: value})


def test_side_overrides_are_ratios_so_schedulers_drive_both() -> None:
    opts = MuonOptions.parse({"lr": 1e-3, "muon_lr": 2e-3})
    assert opts.lr_ratio(use_muon=True) == pytest.approx(2.0)
    assert opts.lr_ratio(use_muon=False) == 1.0
    with pytest.raises(ValueError, match="non-zero lr"):
        MuonOptions.parse({"lr": 0.0, "adam_lr": 1e-3}).lr_ratio(use_muon=False)


def test_one_meaning_per_scale_word() -> None:
    """sqrt(max(1, A / B)) is "shape_scaling", as in Megatron-LM; "spectral" (Megatron-LM's sqrt(max(A, B)))
    is refused with the mapping instead of meaning something else here."""
    from muon_ds.update import update_scale

    assert update_scale((8, 2), MuonOptions.parse({"scale": "shape_scaling"}).scale) == 2.0
    with pytest.raises(ValueError, match="scale: .*'shape_scaling'"):
        MuonOptions.parse({"scale": "spectral"})
