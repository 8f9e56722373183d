"""Moonlight in Megatron-LM's own ``pretrain_gpt.py``: a GPT model builder that uses muon_ds's layer specs.

    torchrun ... -m muon_ds.megatron.launch pretrain_gpt.py "${MOONLIGHT_16B_ARGS[@]}" \\
        --moonlight-config /path/to/Moonlight-16B-A3B/config.json ...

Megatron-LM core_v0.16.1's ``model_provider(model_builder, ...)`` takes the builder as its documented
extension point (``gpt_builders.gpt_builder`` for GPT). Its ``--spec MODULE NAME`` cannot carry Moonlight:
it imports a fixed object (it does not call a function with the config), and a per-layer spec gets a
generic final norm (no sequence parallelism without TransformerEngine) and one MLP kind for every layer,
where Moonlight's first layer is dense. :func:`install` therefore wraps ``gpt_builders.gpt_builder``: with
``--moonlight-spec`` or ``--moonlight-config`` the model is :func:`muon_ds.models.spec.build_moonlight_model`
(MLA with a TP-replicated kv down-projection, dense/MoE per ``--moe-layer-freq``, local or TE modules
per ``--transformer-impl``); without them Megatron-LM's own builder runs unchanged.

Megatron-LM core_v0.19.0's pretrain_gpt.py builds the model from a GPTModelConfig instead
(``argument_utils.gpt_config_from_args``), whose ``transformer_layer_spec`` may be a callable:
:func:`moonlight_model_config` points it at the same Moonlight specs.

The transformer config still comes from Megatron's arguments (``configs/megatron/*.args.sh``), so
parallelism, precision and recompute flags keep their meaning; ``--moonlight-config`` additionally checks
those arguments against an HF ``config.json`` and names every field that differs.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable, Optional

from muon_ds.megatron.version import builds_gpt_from_model_config
from muon_ds.models.config import architecture_from_hf, load_hf_config

__all__ = ["add_arguments", "architecture_mismatches", "install", "moonlight_builder", "moonlight_model_config",
           "uses_moonlight"]

# Fields of the HF mapping that set training behaviour, not the network's function or weight shapes:
# launch scripts may choose them freely.
TRAINING_FIELDS = frozenset({
    "hidden_dropout", "attention_dropout", "init_method_std", "bias_activation_fusion", "moe_token_dispatcher_type",
    "moe_grouped_gemm", "moe_aux_loss_coeff", "moe_router_bias_update_rate", "moe_router_load_balancing_type",
    "moe_router_dtype",
})
_BACKENDS = {"local": "local", "transformer_engine": "te"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--moonlight-spec`` and ``--moonlight-config`` (usable as a Megatron-LM extra_args_provider)."""
    group = parser.add_argument_group("muon_ds Moonlight")
    group.add_argument("--moonlight-spec", action="store_true",
                       help="muon_ds: build the GPT decoder from muon_ds's Moonlight (DeepSeek-V3) layer specs")
    group.add_argument("--moonlight-config", type=str, default=None, metavar="CONFIG_JSON",
                       help="muon_ds: a Moonlight HF config.json (or its directory); implies --moonlight-spec and "
                            "checks that the model arguments describe the same network")
    return parser


def uses_moonlight(args: argparse.Namespace) -> bool:
    """Whether the launch asked for muon_ds's Moonlight specs."""
    return bool(getattr(args, "moonlight_spec", False) or getattr(args, "moonlight_config", None))


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, (list, tuple)) or isinstance(actual, (list, tuple)):
        return isinstance(actual, (list, tuple)) and list(expected) == list(actual)
    return expected == actual


def architecture_mismatches(hf: dict[str, Any], config: Any, vocab_size: Optional[int]) -> list[str]:
    """``'field: HF config says X, Megatron arguments give Y'`` for every architecture field that differs.

    ``vocab_size`` is the tokenizer's padded vocabulary: it may be smaller than the HF config's (whose
    embedding rows the model keeps, as transformers does), never larger."""
    arch = architecture_from_hf(hf)
    problems = [f"{key}: HF config says {value!r}, Megatron arguments give {getattr(config, key, None)!r}"
                for key, value in arch.transformer.items()
                if key not in TRAINING_FIELDS and not _same(value, getattr(config, key, None))]
    if vocab_size is not None and vocab_size > arch.vocab_size:
        problems.append(f"vocab_size: HF config says {arch.vocab_size}, the tokenizer's padded vocabulary is "
                        f"{vocab_size}: token ids from {arch.vocab_size} on have no embedding row (set --vocab-size / "
                        "--make-vocab-size-divisible-by; Megatron-LM core_v0.16.1's NullTokenizer adds an "
                        "end-of-document token to --vocab-size)")
    return problems


def _check_arguments(args: argparse.Namespace, config: Any) -> str:
    """The spec backend name, after refusing the Megatron-LM options the Moonlight builder cannot honour."""
    refused = {
        "--use-legacy-models": getattr(args, "use_legacy_models", False),
        "--spec": getattr(args, "spec", None) is not None,
        "--mtp-num-layers": getattr(args, "mtp_num_layers", None) is not None,
        "--experimental-attention-variant": getattr(args, "experimental_attention_variant", None) is not None,
        "--heterogeneous-layers-config-path": getattr(args, "heterogeneous_layers_config_path", None) is not None,
    }
    bad = [flag for flag, on in refused.items() if on]
    if bad:
        raise ValueError(f"--moonlight-spec/--moonlight-config cannot be combined with {', '.join(bad)}")
    if not getattr(config, "multi_latent_attention", False):
        raise ValueError("Moonlight uses Multi-Latent Attention: add --multi-latent-attention (see "
                         "configs/megatron/moonlight-16b-a3b.args.sh)")
    if not args.untie_embeddings_and_output_weights:
        raise ValueError("Moonlight has an untied output head: add --untie-embeddings-and-output-weights")
    if args.transformer_impl not in _BACKENDS:
        raise ValueError(f"--transformer-impl {args.transformer_impl} is not supported by the Moonlight spec; "
                         f"use one of {sorted(_BACKENDS)}")
    if args.moonlight_config:
        hf = load_hf_config(args.moonlight_config)
        problems = architecture_mismatches(hf, config, getattr(args, "padded_vocab_size", None))
        if problems:
            raise ValueError(f"the Megatron arguments do not describe the model of {args.moonlight_config}:\n  "
                             + "\n  ".join(problems))
        args.padded_vocab_size = architecture_from_hf(hf).vocab_size  # the checkpoint's embedding rows
    return _BACKENDS[args.transformer_impl]


def moonlight_builder(args: argparse.Namespace, pre_process: bool, post_process: bool, vp_stage: Optional[int] = None,
                      config: Any = None, pg_collection: Any = None) -> Any:
    """Megatron-LM's model-builder signature (see its model_provider.py): our Moonlight GPTModel for this stage."""
    from megatron.training import print_rank_0

    from muon_ds.models.spec import build_moonlight_model

    if config is None:
        if args.yaml_cfg is not None:
            from megatron.training.yaml_arguments import core_transformer_config_from_yaml

            config = core_transformer_config_from_yaml(args, "language_model")
        else:
            from megatron.training.arguments import core_transformer_config_from_args

            config = core_transformer_config_from_args(args)
    backend_name = _check_arguments(args, config)
    print_rank_0(f"building Moonlight GPT model from muon_ds's specs ({backend_name} modules) ...")
    return build_moonlight_model(config, args.padded_vocab_size, args.max_position_embeddings,
                                 backend_name=backend_name, pre_process=pre_process, post_process=post_process,
                                 vp_stage=vp_stage, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
                                 parallel_output=True, pg_collection=pg_collection)


def _dispatching(original: Callable[..., Any]) -> Callable[..., Any]:
    def gpt_builder(args: argparse.Namespace, pre_process: bool, post_process: bool, vp_stage: Optional[int] = None,
                    config: Any = None, pg_collection: Any = None) -> Any:
        builder = moonlight_builder if uses_moonlight(args) else original
        return builder(args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection)

    gpt_builder.__wrapped__ = original  # type: ignore[attr-defined]
    return gpt_builder


def _stage_spec(backend_name: str, model_config: Any, vp_stage: Optional[int] = None) -> Any:
    """GPTModelConfig's ``transformer_layer_spec`` callable: this stage's Moonlight layers."""
    from muon_ds.models.spec import moonlight_block_spec

    return moonlight_block_spec(model_config.transformer, backend_name, vp_stage=vp_stage)


def moonlight_model_config(args: argparse.Namespace, model_config: Any) -> Any:
    """Megatron-LM core_v0.19.0's GPTModelConfig (from ``gpt_config_from_args``), naming muon_ds's Moonlight layer
    specs when ``args`` ask for them (and no GPT-level position embedding: MLA applies its own RoPE)."""
    if uses_moonlight(args):
        backend_name = _check_arguments(args, model_config.transformer)
        model_config.transformer_layer_spec = functools.partial(_stage_spec, backend_name)
        model_config.vocab_size = args.padded_vocab_size
        model_config.position_embedding_type = "none"
    return model_config


def _moonlight_model_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def gpt_config_from_args(args: argparse.Namespace, *rest: Any, **kwargs: Any) -> Any:
        return moonlight_model_config(args, original(args, *rest, **kwargs))

    gpt_config_from_args.__wrapped__ = original  # type: ignore[attr-defined]
    return gpt_config_from_args


def install() -> None:
    """Make Megatron-LM's pretrain_gpt.py build Moonlight when asked (idempotent): core_v0.16.1's
    ``gpt_builders.gpt_builder`` or core_v0.19.0's ``argument_utils.gpt_config_from_args``.

    Needs Megatron-LM's top-level ``gpt_builders`` module importable (the directory of pretrain_gpt.py on
    sys.path); call it before pretrain_gpt.py runs, which binds the builder at import.
    """
    import megatron.training.argument_utils as argument_utils

    if builds_gpt_from_model_config(argument_utils):
        if not hasattr(argument_utils.gpt_config_from_args, "__wrapped__"):
            argument_utils.gpt_config_from_args = _moonlight_model_config(argument_utils.gpt_config_from_args)
        return
    try:
        import gpt_builders
    except ImportError as err:
        raise ImportError("--moonlight-spec/--moonlight-config need Megatron-LM's gpt_builders.py next to the "
                          "training script (pretrain_gpt.py of Megatron-LM core_v0.16.1)") from err
    if not hasattr(gpt_builders.gpt_builder, "__wrapped__"):
        gpt_builders.gpt_builder = _dispatching(gpt_builders.gpt_builder)
