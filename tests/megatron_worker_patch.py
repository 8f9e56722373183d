"""Run under a Megatron-LM core_v0.16.1 tree patched with patches/megatron-lm-core_v0.16.1-muon_ds.patch, or under
an unpatched one with ``--launcher`` (muon_ds.megatron.launch.install(), the patch-free route). Tests only.

Parses and validates pretrain_gpt.py-style arguments with --optimizer muon plus the flags Megatron's
own Muon refuses, and prints the effective values as JSON. megatron.training imports triton-only
kernels at import time; a stand-in module replaces them (nothing here runs them).
"""

from __future__ import annotations

import json
import sys
from unittest import mock

sys.modules["megatron.core.transformer.custom_layers.batch_invariant_kernels"] = mock.MagicMock()
LAUNCHER = "--launcher" in sys.argv
if LAUNCHER:
    sys.argv.remove("--launcher")
    from muon_ds.megatron.launch import install

    install()

import megatron.training.arguments as arguments  # noqa: E402
import megatron.training.training as training  # noqa: E402

sys.argv = ["pretrain_gpt.py", "--optimizer", "muon", "--use-distributed-optimizer", "--overlap-grad-reduce",
            "--overlap-param-gather", "--bf16", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
            "4", "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "1", "--lr", "1e-3",
            "--train-iters", "1", *sys.argv[1:]]
args = arguments.validate_args(arguments.parse_args())
factory = training.get_megatron_muon_optimizer if LAUNCHER else training.muon_ds_megatron.get_megatron_optimizer
print(json.dumps({key: getattr(args, key) for key in ("optimizer", "muon_momentum", "muon_use_nesterov",
                                                       "muon_extra_scale_factor", "muon_tp_mode",
                                                       "use_distributed_optimizer", "overlap_param_gather")}
                 | {"factory": factory.__module__}))
