"""Layer and block specs for Moonlight (DeepSeek-V3) in megatron-core, and the GPTModel built from them.

Which module fills which slot is decided by a backend table, TransformerEngine on GPUs or local
megatron-core modules otherwise; dense or MoE MLP per layer by the config's ``moe_layer_freq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from muon_ds.models import without_te
from muon_ds.models.local_layers import (
    LatentRMSNorm,
    MLACoreAttention,
    MoonlightMLASelfAttention,
    RMSNorm,
    TPReplicatedLinear,
)

__all__ = ["Backend", "backend", "moonlight_layer_spec", "moonlight_block_spec", "build_moonlight_model"]


@dataclass(frozen=True)
class Backend:
    """The module classes one implementation family provides for a Moonlight layer."""

    provider: BackendSpecProvider  # megatron's provider, used for the MoE experts
    attention: type
    norm: type
    latent_norm: type  # MLA's q / kv latent RMSNorm
    column_linear: type
    row_linear: type
    replicated_linear: type  # MLA kv down-projection: full weight on every TP rank
    core_attention: type


def _local() -> Backend:
    provider = LocalSpecProvider()
    return Backend(
        provider=provider,
        attention=MoonlightMLASelfAttention,
        norm=RMSNorm,
        latent_norm=LatentRMSNorm,
        column_linear=provider.column_parallel_linear(),
        row_linear=provider.row_parallel_linear(),
        replicated_linear=TPReplicatedLinear,
        core_attention=MLACoreAttention,
    )


def _transformer_engine() -> Backend:
    try:
        import transformer_engine  # noqa: F401  (megatron-core substitutes mocks when it is missing)
    except ImportError as err:
        raise ImportError("backend 'te' needs TransformerEngine; use backend 'local' without it") from err
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    provider = TESpecProvider()
    return Backend(
        provider=provider,
        attention=MoonlightMLASelfAttention,  # builds the q projection without a Q norm on 0.19 too
        norm=TENorm,
        latent_norm=TENorm,  # uses the config's epsilon (1e-5 for Moonlight instead of 1e-6)
        column_linear=provider.column_parallel_linear(),
        row_linear=provider.row_parallel_linear(),
        replicated_linear=provider.linear(),  # TELinear, built "duplicated" by MLA
        core_attention=provider.core_attention(),
    )


_BACKENDS: dict[str, Callable[[], Backend]] = {"local": _local, "te": _transformer_engine}


def backend(name: str) -> Backend:
    """``"local"`` (megatron-core modules, runs anywhere) or ``"te"`` (TransformerEngine, GPUs)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


def _mlp_spec(be: Backend, config: MLATransformerConfig, moe: bool) -> ModuleSpec:
    if moe:
        return get_moe_module_spec_for_backend(
            backend=be.provider, num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=be.column_linear, linear_fc2=be.row_linear))


def moonlight_layer_spec(be: Backend, config: MLATransformerConfig, moe: bool) -> ModuleSpec:
    """One decoder layer: RMSNorm -> MLA -> residual -> RMSNorm -> dense SwiGLU MLP or MoE -> residual."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=be.norm,
            self_attention=ModuleSpec(
                module=be.attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=be.column_linear,
                    linear_q_down_proj=be.column_linear,
                    linear_q_up_proj=be.column_linear,
                    linear_kv_down_proj=be.replicated_linear,
                    linear_kv_up_proj=be.column_linear,
                    core_attention=be.core_attention,
                    linear_proj=be.row_linear,
                    q_layernorm=be.latent_norm,
                    kv_layernorm=be.latent_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=be.norm,
            mlp=_mlp_spec(be, config, moe),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _moe_flags(config: MLATransformerConfig) -> list[bool]:
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [config.num_moe_experts is not None and i % freq == 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries for {config.num_layers} layers")
    return [bool(f) for f in freq]


def moonlight_block_spec(
    config: MLATransformerConfig,
    backend_name: str = "local",
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Specs of the layers this pipeline stage builds, and the final norm."""
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported by the Moonlight spec")
    be = backend(backend_name)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    flags = _moe_flags(config)[offset : offset + count]
    return TransformerBlockSubmodules(
        layer_specs=[moonlight_layer_spec(be, config, moe) for moe in flags], layer_norm=be.norm
    )


def build_moonlight_model(
    config: MLATransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    backend_name: str = "local",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    **gpt_kwargs: Any,
) -> GPTModel:
    """A megatron-core GPTModel with untied embeddings and the Moonlight layer specs."""
    without_te.apply()
    return GPTModel(
        config=config,
        transformer_layer_spec=moonlight_block_spec(config, backend_name, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",  # MLA applies its own RoPE
        vp_stage=vp_stage,
        **gpt_kwargs,
    )
