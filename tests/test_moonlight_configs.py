"""configs/megatron: the Megatron-LM argument files say what the HF configs say, and agree with each other."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from muon_ds.models.config import architecture_from_hf

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("moonlight-16b-a3b", "MOONLIGHT_16B_ARGS", "moonlight-16b-a3b.config.json"),
    ("moonlight-tiny", "MOONLIGHT_TINY_ARGS", "moonlight-tiny.config.json"),
]
# Megatron-LM argument -> MLATransformerConfig field, for every network argument in the files.
SAME_VALUE = {
    "num-layers": "num_layers",
    "hidden-size": "hidden_size",
    "ffn-hidden-size": "ffn_hidden_size",
    "num-attention-heads": "num_attention_heads",
    "kv-lora-rank": "kv_lora_rank",
    "qk-head-dim": "qk_head_dim",
    "qk-pos-emb-head-dim": "qk_pos_emb_head_dim",
    "v-head-dim": "v_head_dim",
    "rope-type": "rope_type",
    "rotary-base": "rotary_base",
    "normalization": "normalization",
    "norm-epsilon": "layernorm_epsilon",
    "init-method-std": "init_method_std",
    "attention-dropout": "attention_dropout",
    "hidden-dropout": "hidden_dropout",
    "num-experts": "num_moe_experts",
    "moe-ffn-hidden-size": "moe_ffn_hidden_size",
    "moe-shared-expert-intermediate-size": "moe_shared_expert_intermediate_size",
    "moe-router-topk": "moe_router_topk",
    "moe-router-score-function": "moe_router_score_function",
    "moe-router-bias-update-rate": "moe_router_bias_update_rate",
    "moe-router-topk-scaling-factor": "moe_router_topk_scaling_factor",
    "moe-router-dtype": "moe_router_dtype",
    "moe-router-load-balancing-type": "moe_router_load_balancing_type",
    "moe-aux-loss-coeff": "moe_aux_loss_coeff",
    "moe-token-dispatcher-type": "moe_token_dispatcher_type",
}
FLAGS = {
    "multi-latent-attention": "multi_latent_attention",
    "qk-layernorm": "qk_layernorm",
    "swiglu": "gated_linear_unit",
    "moe-router-enable-expert-bias": "moe_router_enable_expert_bias",
}


def _sourced(path: Path, variable: str) -> dict:
    out = subprocess.run(["bash", "-c", f'source "{path}"; printf "%s\\n" "${{{variable}[@]}}"'],
                         check=True, capture_output=True, text=True).stdout.split("\n")[:-1]
    args: dict = {}
    for item in out:
        if item.startswith("--"):
            key = item[2:]
            args[key] = True
        else:
            args[key] = item
    return args


@pytest.mark.parametrize("name, variable, hf_name", CASES)
def test_args_file_equals_yaml(name: str, variable: str, hf_name: str) -> None:
    from_yaml = yaml.safe_load((ROOT / "configs" / "megatron" / f"{name}.yaml").read_text())
    sourced = _sourced(ROOT / "configs" / "megatron" / f"{name}.args.sh", variable)
    assert sourced.keys() == from_yaml.keys()
    for key, value in from_yaml.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(sourced[key]) == float(value), key
        else:
            assert sourced[key] == value, key


@pytest.mark.parametrize("name, variable, hf_name", CASES)
def test_yaml_matches_the_hf_config(name: str, variable: str, hf_name: str) -> None:
    args = yaml.safe_load((ROOT / "configs" / "megatron" / f"{name}.yaml").read_text())
    arch = architecture_from_hf(json.loads((ROOT / "tests" / "data" / hf_name).read_text()))
    t = arch.transformer
    for arg, field in SAME_VALUE.items():
        assert args[arg] == pytest.approx(t[field]) if isinstance(t[field], float) else args[arg] == t[field], arg
    for arg, field in FLAGS.items():
        assert args[arg] is True and t[field] is True, arg
    assert args["disable-bias-linear"] is True and t["add_bias_linear"] is False
    assert args["untie-embeddings-and-output-weights"] is True
    assert "q-lora-rank" not in args and t["q_lora_rank"] is None
    assert eval(args["moe-layer-freq"]) == t["moe_layer_freq"]  # Megatron-LM evaluates this expression too
    assert args["max-position-embeddings"] == arch.max_sequence_length
    # the tiny launch uses Megatron's NullTokenizer, which (core_v0.16.1) adds an end-of-document token
    assert args.get("vocab-size", arch.vocab_size - 1) + 1 == arch.vocab_size
