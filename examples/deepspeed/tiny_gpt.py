"""A small byte-level GPT for the examples and benchmarks (plain torch, no optimizer import)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv_q, self.qkv_k, self.qkv_v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(width, width, bias=False)
        self.mlp_up, self.mlp_down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(batch, seq, self.heads, -1).transpose(1, 2)
                   for proj in (self.qkv_q, self.qkv_k, self.qkv_v))
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp_down(nn.functional.gelu(self.mlp_up(self.mlp_norm(x))))


class TinyGPT(nn.Module):
    """Byte-level GPT; embeddings and head are named so muon_ds's rules send them to AdamW."""

    def __init__(self, width: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(256, width)
        self.embed_positions = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x = self.embed_tokens(inputs) + self.embed_positions(torch.arange(inputs.shape[1], device=inputs.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x)).float()
        return nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
