"""TEST SUPPORT ONLY (on PYTHONPATH for the megatron-core 0.19 runs, tests/megatron_core_019.py): Python 3.11 lacks
``typing.override`` (3.12), which megatron-core 0.19, Megatron-LM core_v0.19.0's training scripts and
emerging-optimizers use only as a decorator that returns its argument. Loaded at interpreter start-up, so
processes those scripts spawn get it too."""

import typing

if not hasattr(typing, "override"):
    typing.override = lambda method: method
