"""Patch-free route: run an unmodified Megatron-LM (core_v0.16.1 or core_v0.19.x) script with muon_ds's ``--optimizer muon``.

    torchrun --nproc-per-node 8 -m muon_ds.megatron.launch pretrain_gpt.py --optimizer muon ...

:func:`install` does in this process what the patches (patches/megatron-lm-core_v0.*-muon_ds.patch) do in the
source: registers muon_ds's extra ``--muon-*`` flags, applies Moonlight's defaults instead of
Megatron's Muon asserts, and makes ``setup_model_and_optimizer`` build muon_ds's optimizer.
With ``--moonlight-spec`` or ``--moonlight-config CONFIG_JSON``, pretrain_gpt.py also builds Moonlight
from muon_ds's layer specs (see :mod:`muon_ds.megatron.moonlight_provider`).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any, Callable, Optional

from muon_ds.megatron import moonlight_provider
from muon_ds.megatron import add_arguments
from muon_ds.megatron.arguments import apply_moonlight_defaults
from muon_ds.megatron.optimizer import get_megatron_optimizer
from muon_ds.megatron.version import training_optimizer_factory


MOONLIGHT_FLAGS = ("--moonlight-spec", "--moonlight-config")


MUON_OPTIMIZERS = ("muon", "dist_muon")  # what Megatron-LM's --optimizer calls Muon


def _validate_without_muon_asserts(validate: Callable[..., Any]) -> Callable[..., Any]:
    """Megatron's validate_args, which refuses Muon with the distributed optimizer and overlap (0.16) or turns
    the distributed optimizer into its layer-wise one (0.19), sees Adam; then Moonlight's defaults apply."""

    def validate_args(args: argparse.Namespace, defaults: Optional[dict] = None) -> argparse.Namespace:
        optimizer = args.optimizer
        if optimizer not in MUON_OPTIMIZERS:
            return validate(args, defaults or {})
        args.optimizer = "adam"
        try:
            args = validate(args, defaults or {})
        finally:
            args.optimizer = optimizer
        return apply_moonlight_defaults(args)

    return validate_args


def _muon_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    """Megatron-LM's optimizer factory (either release's, see :func:`training_optimizer_factory`), building
    muon_ds's Muon for ``--optimizer muon`` and calling ``original`` for every other optimizer."""

    def factory(config: Any, model_chunks: Any, config_overrides: Any = None, use_gloo_process_groups: bool = True,
                layer_wise_distributed_optimizer: bool = False, pg_collection: Any = None,
                **kwargs: Any) -> Any:
        if config.optimizer not in MUON_OPTIMIZERS:
            return original(config, model_chunks, config_overrides=config_overrides,
                            use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection, **kwargs)
        if layer_wise_distributed_optimizer or config.optimizer == "dist_muon":
            raise ValueError("--optimizer dist_muon (Megatron's layer-wise distributed Muon) is not muon_ds's; use "
                             "--optimizer muon with --use-distributed-optimizer")
        return get_megatron_optimizer(config, model_chunks, config_overrides=config_overrides,
                                      use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection)

    factory.__wrapped__ = original  # type: ignore[attr-defined]
    return factory


def install() -> None:
    """Point megatron.training at muon_ds's Muon (idempotent)."""
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    if getattr(arguments, "_muon_ds_installed", False):
        return
    add_megatron_arguments = arguments.add_megatron_arguments

    def add_all_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return add_arguments(add_megatron_arguments(parser))

    validate = _validate_without_muon_asserts(arguments.validate_args)
    arguments.add_megatron_arguments = add_all_arguments
    arguments.validate_args = validate
    initialize.validate_args = validate
    name = training_optimizer_factory(training)
    setattr(training, name, _muon_factory(getattr(training, name)))
    arguments._muon_ds_installed = True


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m muon_ds.megatron.launch SCRIPT ARGS...``: install, then run SCRIPT as ``__main__``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m muon_ds.megatron.launch pretrain_gpt.py [Megatron-LM arguments]")
    if not os.path.isfile(argv[0]):
        raise SystemExit(f"training script not found: {argv[0]} (pass Megatron-LM's pretrain_gpt.py)")
    install()
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as ``python SCRIPT`` would
    if any(arg.split("=", 1)[0] in MOONLIGHT_FLAGS for arg in argv[1:]):
        moonlight_provider.install()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
