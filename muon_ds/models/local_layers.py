"""Local (non-TransformerEngine) layers that megatron-core 0.16.1 lacks for a correct MLA model.

- ``TPReplicatedLinear``: the MLA kv down-projection must be replicated over tensor-parallel ranks, as
  the TE spec builds it (``TELinear``, parallel_mode "duplicated"). megatron-core's local spec builds
  it column-parallel, and then the gradient of the shared RoPE key is never summed over the TP ranks
  (NVIDIA/Megatron-LM#1699).
- ``RMSNorm``: torch's RMSNorm (megatron's ``WrappedTorchNorm``) refuses sequence parallelism, which
  MoE with TP > 1 requires.
- ``LatentRMSNorm``: DeepSeek-V3's latent norms use eps 1e-6, not the config's ``rms_norm_eps``.
- ``MLACoreAttention``: megatron's local ``DotProductAttention`` has no separate key/value head sizes.
- ``MoonlightMLASelfAttention``: megatron's MLA accepts only a fixed list of kv down-projection
  classes, so it is built with the standard one and then replaced by ``TPReplicatedLinear``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

__all__ = ["TPReplicatedLinear", "RMSNorm", "LatentRMSNorm", "MLACoreAttention", "MoonlightMLASelfAttention"]


def _param_device(config: TransformerConfig) -> Any:
    """As megatron's layers choose it: the default device (CPU, or a ``torch.device`` context such as
    meta) for CPU initialisation, else the current GPU."""
    return None if config.use_cpu_initialization else torch.cuda.current_device()


def _mark_sequence_parallel(param: torch.nn.Parameter, config: TransformerConfig) -> None:
    """Under sequence parallelism each TP rank sees a slice of the tokens, so Megatron's
    finalize_model_grads must all-reduce this replicated parameter's gradient over TP."""
    tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    setattr(param, "sequence_parallel", config.sequence_parallel)


class TPReplicatedLinear(MegatronModule):
    """A bias-free linear layer whose full weight lives on every tensor-parallel rank."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=_param_device(config))
        )
        if config.perform_initialization:
            if config.use_cpu_initialization:
                config.init_method(self.weight.data)
            else:  # identical on all TP ranks, like TE's duplicated linear
                with get_cuda_rng_tracker().fork(get_data_parallel_rng_tracker_name()):
                    config.init_method(self.weight.data)
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Returns (output, bias) like megatron's parallel linears."""
        return F.linear(x, self.weight), None


class RMSNorm(MegatronModule):
    """RMSNorm computed in float32 like DeepSeek-V3's reference, usable with sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused: Any) -> None:
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config))
        )
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LatentRMSNorm(RMSNorm):
    """RMSNorm of MLA's compressed q / kv latents: DeepSeek-V3 builds these with eps 1e-6 whatever
    ``rms_norm_eps`` says, while megatron-core passes the config's epsilon."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused: Any) -> None:
        super().__init__(config=config, hidden_size=hidden_size, eps=1e-6)


class MLACoreAttention(MegatronModule):
    """Causal softmax attention with separate query/key and value head sizes (MLA)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
        attention_dropout: Optional[float] = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("MLACoreAttention: context parallelism needs the TransformerEngine spec")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"MLACoreAttention: only causal attention is supported, got {attn_mask_type}")
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """[s, b, heads, d] inputs -> [s, b, heads * v_dim]; ``attention_mask`` True means masked out."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("MLACoreAttention: packed sequences and attention bias need the TransformerEngine spec")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        s_q, s_k = q.shape[2], k.shape[2]
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
        if attention_mask is not None:
            allowed = allowed & ~attention_mask.to(torch.bool)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )
        b, heads, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dv)


class MoonlightMLASelfAttention(MLASelfAttention):
    """megatron-core's MLA self-attention, with the kv down-projection replicated over TP when the
    spec asks for ``TPReplicatedLinear``, and on every megatron-core release the q/kv projections and
    latent norms the spec names (both backends)."""

    def __init__(
        self,
        config: MLATransformerConfig,
        submodules: MLASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
        **kwargs: Any,  # megatron-core 0.19's pp_layer_offset and name
    ) -> None:
        replicate = submodules.linear_kv_down_proj is TPReplicatedLinear
        if replicate:
            if config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
                raise ValueError(
                    "linear_kv_down_proj is TP-replicated: tensor_model_parallel_size > 1 needs "
                    "sequence_parallel=True, or the RoPE key gradient is not summed over TP ranks"
                )
            submodules = dataclasses.replace(submodules, linear_kv_down_proj=ColumnParallelLinear)
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            **kwargs,
        )
        if replicate:
            self.linear_kv_down_proj = TPReplicatedLinear(
                config.hidden_size, config.kv_lora_rank + config.qk_pos_emb_head_dim, config=config
            )

    def _resolve_qk_norm_config(self, submodules: MLASelfAttentionSubmodules) -> dict[str, Any]:
        """The q/kv projections and latent norms exactly as the spec gives them.

        megatron-core 0.19 calls this hook (0.16 has none and builds the spec as given); its own resolution
        fuses a layernorm into ``linear_q_proj`` when ``q_lora_rank`` is None, a Q norm Moonlight does not
        have (cf. Megatron-Bridge #5261), and without TransformerEngine it cannot build that fused layer.
        """
        return {
            "linear_q_proj": submodules.linear_q_proj,
            "linear_q_up_proj": submodules.linear_q_up_proj,
            "linear_kv_up_proj": submodules.linear_kv_up_proj,
            "q_layernorm": submodules.q_layernorm if self.config.q_lora_rank is not None else IdentityOp,
            "kv_layernorm": submodules.kv_layernorm,
        }
