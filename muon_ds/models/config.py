"""Moonlight / DeepSeek-V3 Hugging Face ``config.json`` -> megatron-core ``MLATransformerConfig``.

Every field of the HF config is either mapped to Megatron arguments, accepted as metadata that has no
effect on the network, or rejected with an error naming it: a field silently dropped would give a
Megatron model that differs from the checkpoint it claims to load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "UnmappableConfigError",
    "MoonlightArchitecture",
    "load_hf_config",
    "architecture_from_hf",
    "mla_transformer_config",
    "moe_layer_pattern",
]


class UnmappableConfigError(ValueError):
    """An HF config field whose value megatron-core cannot represent."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(f"HF config field {key!r}={value!r} cannot be mapped to megatron-core: {reason}")
        self.key = key


@dataclass(frozen=True)
class MoonlightArchitecture:
    """What the HF config says about the network, in Megatron terms.

    ``transformer`` holds MLATransformerConfig keyword arguments; the rest are GPTModel arguments.
    """

    transformer: dict[str, Any]
    vocab_size: int
    max_sequence_length: int


Handler = Callable[[Any, dict[str, Any]], dict[str, Any]]


def _number(key: str, kind: type, name: str | None = None, minimum: float = 0) -> Handler:
    """A field that must be a number (``int`` or ``float``) >= ``minimum``, mapped to ``name`` if given."""

    def handler(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (kind is int and value != int(value)) or value < minimum:
            what = "an integer" if kind is int else "a number"
            raise UnmappableConfigError(key, value, f"must be {what} >= {minimum:g}")
        return {name: kind(value)} if name else {}

    return handler


def _derived(key: str, value_from: Callable[[dict[str, Any]], int], formula: str) -> Handler:
    """A field transformers writes but derives from others (``head_dim``, ``qk_head_dim``): must agree."""

    def handler(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
        if value != value_from(cfg):
            raise UnmappableConfigError(key, value, f"must equal {formula} = {value_from(cfg)!r}")
        return {}

    return handler


def _metadata(_value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    """Fields without effect on the network's function (tokenizer ids, provenance, caching)."""
    return {}


def _require(key: str, allowed: Callable[[Any], bool], reason: str, mapped: dict[str, Any] | None = None) -> Handler:
    def handler(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
        if not allowed(value):
            raise UnmappableConfigError(key, value, reason)
        return dict(mapped or {})

    return handler


def _architectures(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    if value not in (["DeepseekV3ForCausalLM"], None):
        raise UnmappableConfigError("architectures", value, "only DeepseekV3ForCausalLM is supported")
    return {}


def _hidden_act(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.nn.functional as F

    if value != "silu":
        raise UnmappableConfigError("hidden_act", value, "only SwiGLU (silu) is supported")
    return {"gated_linear_unit": True, "activation_func": F.silu, "bias_activation_fusion": False}


def _rope_theta(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"rope_type": "rope", **_number("rope_theta", float, "rotary_base", 1)(value, cfg),
            "rotary_scaling_factor": 1.0}


def _rope_parameters(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or value.get("rope_type", "default") != "default":
        raise UnmappableConfigError("rope_parameters", value, "only plain RoPE (rope_type 'default') is supported")
    extra = set(value) - {"rope_type", "rope_theta"}
    if extra:
        raise UnmappableConfigError("rope_parameters", value, f"unsupported keys {sorted(extra)}")
    return _rope_theta(value["rope_theta"], _cfg) if "rope_theta" in value else {}


def _rope_scaling(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    if value is not None:
        raise UnmappableConfigError("rope_scaling", value, "RoPE scaling (YaRN) is not supported by this mapping")
    return {}


def _num_key_value_heads(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    if value not in (None, cfg["num_attention_heads"]):
        raise UnmappableConfigError("num_key_value_heads", value, "MLA needs one KV head per attention head")
    return {}


def _q_lora_rank(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"q_lora_rank": None} if value is None else _number("q_lora_rank", int, "q_lora_rank", 1)(value, cfg)


def _n_shared_experts(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    _number("n_shared_experts", int)(value, cfg)
    return {"moe_shared_expert_intermediate_size": value * cfg["moe_intermediate_size"]} if value else {}


def _norm_topk_prob(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    # Megatron's sigmoid router always renormalises the top-k scores when top-k > 1.
    if cfg.get("scoring_func", "sigmoid") == "sigmoid" and cfg["num_experts_per_tok"] > 1 and not value:
        raise UnmappableConfigError("norm_topk_prob", value, "megatron-core's sigmoid router always normalises")
    return {}


def _scoring_func(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    if value != "sigmoid":
        raise UnmappableConfigError("scoring_func", value, "only sigmoid routing (DeepSeek-V3) is supported")
    return {"moe_router_score_function": "sigmoid", "moe_router_dtype": "fp32"}


def _topk_method(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    if value != "noaux_tc":
        raise UnmappableConfigError("topk_method", value, "only aux-loss-free expert bias (noaux_tc) is supported")
    # DeepSeek-V3's bias update speed gamma = 0.001.
    return {"moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 1e-3}


def _n_group(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    _number("n_group", int, minimum=1)(value, cfg)
    if value == 1:
        return {}
    _number("topk_group", int, minimum=1)(cfg.get("topk_group"), cfg)
    # HF scores a group by its best two experts; Megatron by its best top_k / topk_group experts.
    if cfg["num_experts_per_tok"] // cfg["topk_group"] != 2:
        raise UnmappableConfigError("n_group", value, "Megatron scores groups by top_k/topk_group experts, HF by 2")
    return {"moe_router_num_groups": int(value), "moe_router_group_topk": int(cfg["topk_group"])}


def _topk_group(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    if value is not None:
        _number("topk_group", int, minimum=1)(value, cfg)
    if cfg.get("n_group") in (None, 1) and value not in (None, 1):
        raise UnmappableConfigError("topk_group", value, "needs n_group > 1")
    return {}  # mapped together with n_group


def _seq_aux(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    return {"moe_router_load_balancing_type": "seq_aux_loss" if value else "aux_loss"}


def _first_k_dense_replace(value: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    return _number("first_k_dense_replace", int)(value, cfg)  # mapped in moe_layer_pattern


def _dtype(value: Any, _cfg: dict[str, Any]) -> dict[str, Any]:
    if value not in (None, "bfloat16", "float16", "float32"):
        raise UnmappableConfigError("torch_dtype", value, "expected bfloat16, float16 or float32")
    return {}  # the stored dtype is kept tensor by tensor; training precision is a launch flag


_HANDLERS: dict[str, Handler] = {
    "architectures": _architectures,
    "model_type": _require("model_type", lambda v: v == "deepseek_v3", "expected 'deepseek_v3'"),
    "attention_bias": _require("attention_bias", lambda v: not v, "biased attention projections are not supported"),
    "attention_dropout": _number("attention_dropout", float, "attention_dropout"),
    "hidden_act": _hidden_act,
    "hidden_size": _number("hidden_size", int, "hidden_size", 1),
    "intermediate_size": _number("intermediate_size", int, "ffn_hidden_size", 1),
    "moe_intermediate_size": _number("moe_intermediate_size", int, "moe_ffn_hidden_size", 1),
    "num_hidden_layers": _number("num_hidden_layers", int, "num_layers", 1),
    "num_attention_heads": _number("num_attention_heads", int, "num_attention_heads", 1),
    "num_key_value_heads": _num_key_value_heads,
    "q_lora_rank": _q_lora_rank,
    "kv_lora_rank": _number("kv_lora_rank", int, "kv_lora_rank", 1),
    "qk_nope_head_dim": _number("qk_nope_head_dim", int, "qk_head_dim", 1),
    "qk_rope_head_dim": _number("qk_rope_head_dim", int, "qk_pos_emb_head_dim", 1),
    "v_head_dim": _number("v_head_dim", int, "v_head_dim", 1),
    # written by transformers 5 from the two above
    "head_dim": _derived("head_dim", lambda c: c["qk_rope_head_dim"], "qk_rope_head_dim"),
    "qk_head_dim": _derived("qk_head_dim", lambda c: c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
                            "qk_nope_head_dim + qk_rope_head_dim"),
    "rms_norm_eps": lambda v, c: {**_number("rms_norm_eps", float, "layernorm_epsilon")(v, c),
                                  "normalization": "RMSNorm"},
    "rope_theta": _rope_theta,
    "rope_parameters": _rope_parameters,
    "rope_scaling": _rope_scaling,
    "rope_interleave": _require("rope_interleave", lambda v: v in (None, True), "Megatron's MLA RoPE is interleaved"),
    "initializer_range": _number("initializer_range", float, "init_method_std"),
    "n_routed_experts": _number("n_routed_experts", int, "num_moe_experts", 1),
    "num_experts_per_tok": _number("num_experts_per_tok", int, "moe_router_topk", 1),
    "n_shared_experts": _n_shared_experts,
    "routed_scaling_factor": _number("routed_scaling_factor", float, "moe_router_topk_scaling_factor"),
    "scoring_func": _scoring_func,
    "topk_method": _topk_method,
    "norm_topk_prob": _norm_topk_prob,
    "n_group": _n_group,
    "topk_group": _topk_group,
    "aux_loss_alpha": _number("aux_loss_alpha", float, "moe_aux_loss_coeff"),
    "seq_aux": _seq_aux,
    "first_k_dense_replace": _first_k_dense_replace,
    "moe_layer_freq": _require(
        "moe_layer_freq",
        lambda v: v in (None, 1),
        "transformers' DeepseekV3 makes every layer after the dense ones MoE",
    ),
    # transformers writes 1 by default; the converter refuses MTP only where a checkpoint holds its weights
    "num_nextn_predict_layers": _number("num_nextn_predict_layers", int),
    "tie_word_embeddings": _require(
        "tie_word_embeddings", lambda v: not v, "Moonlight has an untied output head; tied heads are not converted"
    ),
    "pretraining_tp": _require("pretraining_tp", lambda v: v in (None, 1), "sliced pretraining_tp matmuls"),
    "torch_dtype": _dtype,
    "dtype": _dtype,
    "vocab_size": _number("vocab_size", int, minimum=1),  # GPTModel argument
    "max_position_embeddings": _number("max_position_embeddings", int, minimum=1),  # GPTModel argument
    "ep_size": _metadata,  # inference-time parallelism of the original remote code
    "auto_map": _metadata,
    "bos_token_id": _metadata,
    "eos_token_id": _metadata,
    "pad_token_id": _metadata,
    "transformers_version": _metadata,
    "use_cache": _metadata,
    "output_router_logits": _metadata,
}

_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a ValueError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` from an HF model directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"HF config not found: {path}")
    return read_json(path)


def moe_layer_pattern(hf: dict[str, Any]) -> list[int]:
    """Per layer 1 for MoE, 0 for dense, as HF's DeepseekV3 builds them (Megatron's ``moe_layer_freq``)."""
    first_dense = int(hf.get("first_k_dense_replace", 0) or 0)
    return [int(i >= first_dense) for i in range(int(hf["num_hidden_layers"]))]


def architecture_from_hf(hf: dict[str, Any]) -> MoonlightArchitecture:
    """Map every field of the HF config, or raise ``UnmappableConfigError`` naming the first that cannot be."""
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise UnmappableConfigError(missing[0], None, "required field is missing")
    unknown = sorted(set(hf) - set(_HANDLERS))
    if unknown:
        raise UnmappableConfigError(unknown[0], hf[unknown[0]], "field is not known to the Moonlight mapping")
    if "rope_theta" not in hf and "rope_theta" not in (hf.get("rope_parameters") or {}):
        raise UnmappableConfigError("rope_theta", None, "required field is missing")
    kwargs: dict[str, Any] = {
        "multi_latent_attention": True,
        "qk_layernorm": True,  # MLA's RMSNorm on the kv (and q) latents; Megatron-LM's specs key on it
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": False,
    }
    for key in sorted(hf, key=lambda k: k not in _REQUIRED):  # sizes first: other fields are checked against them
        kwargs.update(_HANDLERS[key](hf[key], hf))
    pattern = moe_layer_pattern(hf)
    kwargs["moe_layer_freq"] = pattern
    return MoonlightArchitecture(
        transformer=kwargs,
        vocab_size=int(hf["vocab_size"]),
        max_sequence_length=int(hf["max_position_embeddings"]),
    )


def mla_transformer_config(hf: dict[str, Any], **overrides: Any) -> "MLATransformerConfig":  # noqa: F821
    """Build megatron-core's MLATransformerConfig; ``overrides`` carry parallelism and precision flags."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kwargs = dict(architecture_from_hf(hf).transformer)
    kwargs.update(overrides)
    return MLATransformerConfig(**kwargs)
