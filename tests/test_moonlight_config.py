"""The HF config -> Megatron mapping: real Moonlight sizes, and a named error for every field we cannot map."""

import json
from pathlib import Path

import pytest

from muon_ds.models.config import UnmappableConfigError, architecture_from_hf, moe_layer_pattern

DATA = Path(__file__).parent / "data"


def _moonlight() -> dict:
    return json.loads((DATA / "moonlight-16b-a3b.config.json").read_text())


def test_real_config_maps_to_the_stated_sizes() -> None:
    arch = architecture_from_hf(_moonlight())
    t = arch.transformer
    assert (t["hidden_size"], t["num_layers"], t["num_attention_heads"]) == (2048, 27, 16)
    assert (t["num_moe_experts"], t["moe_ffn_hidden_size"], t["moe_router_topk"]) == (64, 1408, 6)
    assert t["moe_shared_expert_intermediate_size"] == 2 * 1408
    assert (arch.vocab_size, arch.max_sequence_length) == (163840, 8192)
    assert t["q_lora_rank"] is None and t["kv_lora_rank"] == 512
    assert (t["qk_head_dim"], t["qk_pos_emb_head_dim"], t["v_head_dim"]) == (128, 64, 128)
    assert (t["rope_type"], t["rotary_base"]) == ("rope", 50000.0)
    assert t["moe_router_score_function"] == "sigmoid" and t["moe_router_enable_expert_bias"]
    assert t["moe_router_topk_scaling_factor"] == 2.446
    assert t["moe_layer_freq"] == [0] + [1] * 26
    assert t["gated_linear_unit"] and t["normalization"] == "RMSNorm"


@pytest.mark.parametrize(
    "key, value",
    [
        ("scoring_func", "softmax"),  # a known field with a value Megatron's router cannot reproduce
        ("norm_topk_prob", False),
        ("rope_scaling", {"type": "yarn", "factor": 40}),
        ("tie_word_embeddings", True),
        ("moe_layer_freq", 2),
        ("some_new_field", 1),  # an unknown field is never silently dropped
    ],
)
def test_unmappable_field_is_named(key: str, value: object) -> None:
    hf = _moonlight() | {key: value}
    with pytest.raises(UnmappableConfigError, match=repr(key)) as err:
        architecture_from_hf(hf)
    assert err.value.key == key


def test_group_routing_that_megatron_scores_differently_is_rejected() -> None:
    # HF scores a group by its best 2 experts, Megatron by top_k / topk_group = 6 / 2 = 3.
    hf = _moonlight() | {"n_group": 8, "topk_group": 2}
    with pytest.raises(UnmappableConfigError, match="'n_group'"):
        architecture_from_hf(hf)


def test_first_k_dense_layers() -> None:
    assert moe_layer_pattern(_moonlight() | {"first_k_dense_replace": 3})[:4] == [0, 0, 0, 1]
