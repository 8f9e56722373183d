"""Where every tensor of a Moonlight checkpoint lives, in HF files and in Megatron's per-rank files.

HF side: the original Moonlight/DeepSeek-V3 file layout (per-expert keys, ``e_score_correction_bias``).
Megatron side: megatron-core's GPTModel built from ``muon_ds.models.spec`` with the local backend, in
the legacy per-rank layout (``mp_rank_TT[_PPP][_EEE]``), expert tensor parallel size equal to TP.
Both conversion directions and the shape checks use this one table.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from muon_ds.glu_layout import shard_glu, unshard_glu
from muon_ds.models.config import moe_layer_pattern

__all__ = ["Parallelism", "Entry", "hf_shapes", "mtp_weights", "rank_entries", "shard", "unshard", "stage_layers"]

# How a Megatron tensor is cut from its HF tensor(s) over the tensor-parallel ranks.
REPLICATED, COLUMN, ROW, GLU = "replicated", "column", "row", "glu"


@dataclass(frozen=True)
class Parallelism:
    """Tensor, pipeline and expert parallel sizes of a Megatron checkpoint.

    ``first_stage_layers`` / ``last_stage_layers`` are Megatron-LM's
    ``--decoder-first/last-pipeline-num-layers``: the other stages split the remaining layers evenly.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def stage_sizes(self, num_layers: int) -> list[int]:
        """Decoder layers per pipeline stage, as megatron-core assigns them."""
        ends = [n for n in (self.first_stage_layers, self.last_stage_layers) if n is not None]
        if ends and self.pp == 1:
            raise ValueError("first/last pipeline stage layer counts need pp > 1")
        middle_stages = self.pp - len(ends)
        remaining = num_layers - sum(ends)
        if remaining < 0 or (middle_stages == 0 and remaining) or (middle_stages and remaining % middle_stages):
            raise ValueError(f"num_hidden_layers={num_layers} cannot be split over pp={self.pp} stages "
                             f"(first={self.first_stage_layers}, last={self.last_stage_layers})")
        sizes = [remaining // middle_stages if middle_stages else 0] * self.pp
        if self.first_stage_layers is not None:
            sizes[0] = self.first_stage_layers
        if self.last_stage_layers is not None:
            sizes[-1] = self.last_stage_layers
        return sizes

    def megatron_kwargs(self) -> dict[str, int | None]:
        """The matching TransformerConfig arguments."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "expert_model_parallel_size": self.ep,
            "num_layers_in_first_pipeline_stage": self.first_stage_layers,
            "num_layers_in_last_pipeline_stage": self.last_stage_layers,
        }

    def check(self, hf: dict[str, Any]) -> None:
        """Raise ValueError naming the size that does not divide the model."""
        for name, size in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep)):
            if size < 1:
                raise ValueError(f"{name} must be >= 1, got {size}")
        need = {
            "num_attention_heads": (hf["num_attention_heads"], self.tp),
            "vocab_size": (hf["vocab_size"], self.tp),
            "intermediate_size": (hf["intermediate_size"], self.tp),
            "moe_intermediate_size": (hf["moe_intermediate_size"], self.tp),
            "n_routed_experts": (hf["n_routed_experts"], self.ep),
        }
        for field, (value, size) in need.items():
            if value % size:
                raise ValueError(f"{field}={value} is not divisible by the parallel size {size}")
        self.stage_sizes(hf["num_hidden_layers"])

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
        """Megatron-LM's legacy checkpoint directory name for one rank."""
        name = f"mp_rank_{tp_rank:02d}"
        if self.pp > 1:
            name += f"_{pp_rank:03d}"
        if self.ep > 1:
            name += f"_{ep_rank:03d}"
        return name

    def ranks(self) -> list[tuple[int, int, int]]:
        """All (tp_rank, pp_rank, ep_rank) in file-writing order."""
        return [(t, p, e) for p in range(self.pp) for e in range(self.ep) for t in range(self.tp)]


@dataclass(frozen=True)
class Entry:
    """One Megatron tensor of one rank file and the HF tensor(s) it is cut from."""

    megatron_key: str
    hf_keys: tuple[str, ...]
    split: str
    parallel_linear: bool = False  # megatron's Column/RowParallelLinear also save ``_extra_state``
    expert: bool = False  # sharded over EP; other entries are copied to every EP rank

    @property
    def extra_state_key(self) -> str | None:
        """The ``_extra_state`` entry a parallel linear saves next to its weight (None for local modules)."""
        return self.megatron_key[: -len("weight")] + "_extra_state" if self.parallel_linear else None


def stage_layers(num_layers: int, par: Parallelism, pp_rank: int) -> range:
    """Global indices of the decoder layers on one pipeline stage."""
    sizes = par.stage_sizes(num_layers)
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def _attention(hf: dict[str, Any], h: str) -> list[Entry]:
    a = f"{h}.self_attn."
    if hf.get("q_lora_rank") is None:
        q = [Entry("self_attention.linear_q_proj.weight", (a + "q_proj.weight",), COLUMN, True)]
    else:
        q = [
            Entry("self_attention.linear_q_down_proj.weight", (a + "q_a_proj.weight",), COLUMN, True),
            Entry("self_attention.q_layernorm.weight", (a + "q_a_layernorm.weight",), REPLICATED),
            Entry("self_attention.linear_q_up_proj.weight", (a + "q_b_proj.weight",), COLUMN, True),
        ]
    return [
        Entry("input_layernorm.weight", (f"{h}.input_layernorm.weight",), REPLICATED),
        *q,
        Entry("self_attention.linear_kv_down_proj.weight", (a + "kv_a_proj_with_mqa.weight",), REPLICATED),
        Entry("self_attention.kv_layernorm.weight", (a + "kv_a_layernorm.weight",), REPLICATED),
        Entry("self_attention.linear_kv_up_proj.weight", (a + "kv_b_proj.weight",), COLUMN, True),
        Entry("self_attention.linear_proj.weight", (a + "o_proj.weight",), ROW, True),
        Entry("pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",), REPLICATED),
    ]


def _swiglu(megatron: str, hf: str, expert: bool = False) -> list[Entry]:
    return [
        Entry(f"{megatron}.linear_fc1.weight", (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), GLU, True, expert),
        Entry(f"{megatron}.linear_fc2.weight", (f"{hf}.down_proj.weight",), ROW, True, expert),
    ]


def _layer_entries(
    hf: dict[str, Any], layer: int, local: int, moe: bool, par: Parallelism, ep_rank: int
) -> list[Entry]:
    h = f"model.layers.{layer}"
    entries = _attention(hf, h)
    if not moe:
        entries += _swiglu("mlp", f"{h}.mlp")
    else:
        entries += [
            Entry("mlp.router.weight", (f"{h}.mlp.gate.weight",), REPLICATED),
            Entry("mlp.router.expert_bias", (f"{h}.mlp.gate.e_score_correction_bias",), REPLICATED),
        ]
        if hf.get("n_shared_experts"):
            entries += _swiglu("mlp.shared_experts", f"{h}.mlp.shared_experts")
        per_rank = hf["n_routed_experts"] // par.ep
        for j in range(per_rank):
            entries += _swiglu(f"mlp.experts.local_experts.{j}", f"{h}.mlp.experts.{ep_rank * per_rank + j}", True)
    return [dataclasses.replace(e, megatron_key=f"decoder.layers.{local}.{e.megatron_key}") for e in entries]


def rank_entries(hf: dict[str, Any], par: Parallelism, pp_rank: int, ep_rank: int) -> list[Entry]:
    """Every tensor of the rank files at (pp_rank, ep_rank); identical for all TP ranks."""
    pattern = moe_layer_pattern(hf)
    layers = stage_layers(hf["num_hidden_layers"], par, pp_rank)
    entries: list[Entry] = []
    if pp_rank == 0:
        entries.append(Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), COLUMN))
    for local, layer in enumerate(layers):
        entries += _layer_entries(hf, layer, local, bool(pattern[layer]), par, ep_rank)
    if pp_rank == par.pp - 1:
        entries.append(Entry("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
        entries.append(Entry("output_layer.weight", ("lm_head.weight",), COLUMN, True))
    return entries


def hf_shapes(hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Moonlight checkpoint must hold, with its shape, in file order."""
    H, V, nh = hf["hidden_size"], hf["vocab_size"], hf["num_attention_heads"]
    nope, rope, v, kv = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"], hf["kv_lora_rank"]
    I, Im, E = hf["intermediate_size"], hf["moe_intermediate_size"], hf["n_routed_experts"]
    Is = Im * (hf.get("n_shared_experts") or 0)
    q_rank = hf.get("q_lora_rank")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i, moe in enumerate(moe_layer_pattern(hf)):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        if q_rank is None:
            shapes[p + "self_attn.q_proj.weight"] = (nh * (nope + rope), H)
        else:
            shapes[p + "self_attn.q_a_proj.weight"] = (q_rank, H)
            shapes[p + "self_attn.q_a_layernorm.weight"] = (q_rank,)
            shapes[p + "self_attn.q_b_proj.weight"] = (nh * (nope + rope), q_rank)
        shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (kv + rope, H)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (kv,)
        shapes[p + "self_attn.kv_b_proj.weight"] = (nh * (nope + v), kv)
        shapes[p + "self_attn.o_proj.weight"] = (H, nh * v)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        mlps = [(p + "mlp.", I)] if not moe else [(p + f"mlp.experts.{e}.", Im) for e in range(E)]
        if moe:
            shapes[p + "mlp.gate.weight"] = (E, H)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (E,)
            if Is:
                mlps.append((p + "mlp.shared_experts.", Is))
        for prefix, inner in mlps:
            shapes[prefix + "gate_proj.weight"] = (inner, H)
            shapes[prefix + "up_proj.weight"] = (inner, H)
            shapes[prefix + "down_proj.weight"] = (H, inner)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def mtp_weights(hf: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """The multi-token prediction tensors among ``keys``: DeepSeek-V3 stores its MTP modules as decoder
    layers numbered from ``num_hidden_layers`` on."""
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    return sorted(k for k in keys if (m := layer.match(k)) and int(m.group(1)) >= hf["num_hidden_layers"])


def shard(tensors: list[torch.Tensor], split: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's piece of the Megatron tensor made from the HF tensor(s); a copy, not a view."""
    if split == REPLICATED:
        return tensors[0].clone()
    if split == COLUMN:
        return tensors[0].chunk(tp, dim=0)[tp_rank].clone()
    if split == ROW:
        return tensors[0].chunk(tp, dim=1)[tp_rank].clone()
    if split == GLU:
        return shard_glu(*tensors, tp, tp_rank)
    raise ValueError(f"unknown split {split!r}")


def unshard(pieces: list[torch.Tensor], split: str) -> list[torch.Tensor]:
    """Inverse of ``shard`` over all TP ranks' pieces (in rank order): the HF tensor(s)."""
    if split == REPLICATED:
        first = pieces[0]
        for rank, piece in enumerate(pieces[1:], start=1):
            if not torch.equal(first, piece):
                raise ValueError(f"replicated tensor differs between TP rank 0 and TP rank {rank}")
        return [first.clone()]
    if split == COLUMN:
        return [torch.cat(pieces, dim=0)]
    if split == ROW:
        return [torch.cat(pieces, dim=1)]
    if split == GLU:
        return list(unshard_glu(pieces))
    raise ValueError(f"unknown split {split!r}")
