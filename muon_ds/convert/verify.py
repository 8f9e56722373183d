"""Check a converted checkpoint: Megatron logits from our spec == transformers' DeepseekV3ForCausalLM.

Both models run in float32 on the same random tokens; the largest absolute logit difference must be
within float32 rounding: ``rtol`` times the largest absolute logit. Runs on every rank of a TP x EP
world whose sizes match the checkpoint (pipeline parallel checkpoints: convert at PP=1 to verify).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from muon_ds.convert.megatron_files import load_rank_model, rank_file, read_layout
from muon_ds.models.config import architecture_from_hf, mla_transformer_config

__all__ = [
    "VerifyResult",
    "verify_checkpoint",
    "load_megatron_model",
    "load_hf_model",
    "megatron_logits",
    "init_verify_world",
    "DEFAULT_RTOL",
]

DEFAULT_RTOL = 2e-5  # a wrong latent-norm epsilon alone gives ~2e-5 on the tiny model


@dataclass(frozen=True)
class VerifyResult:
    """Largest |Megatron - HF| logit difference, the logit scale, and the verdict."""

    max_abs_diff: float
    max_abs_logit: float
    rtol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.rtol * self.max_abs_logit


def init_verify_world(tp: int, ep: int, device: torch.device) -> None:
    """Start torch.distributed (from torchrun's env, or a world of one) and Megatron's parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)  # no dropout to seed; runs without CUDA


@contextlib.contextmanager
def _cuda_device_named_cpu(device: torch.device) -> Iterator[None]:
    """megatron-core's MLA builds and computes its RoPE frequencies on ``torch.cuda.current_device()``
    whatever ``use_cpu_initialization`` says, which raises on a CPU-only torch: on CPU it names the CPU."""
    if device.type != "cpu":
        yield
        return
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = current_device


def load_megatron_model(megatron_dir: Path, device: torch.device) -> torch.nn.Module:
    """This rank's piece of the converted model, built from our spec in float32 with full logits."""
    from megatron.core import parallel_state as ps

    from muon_ds.models.spec import build_moonlight_model

    par, hf = read_layout(megatron_dir)
    if par.pp != 1:
        raise ValueError(f"verify needs a PP=1 checkpoint, {megatron_dir} has pp={par.pp}")
    world = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size())
    if world != (par.tp, par.ep):
        raise ValueError(f"checkpoint has tp={par.tp}, ep={par.ep}; this world has tp={world[0]}, ep={world[1]}")
    arch = architecture_from_hf(hf)
    config = mla_transformer_config(
        hf,
        **par.megatron_kwargs(),
        sequence_parallel=par.tp > 1,
        params_dtype=torch.float32,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,
        # the all-to-all dispatcher needs CUDA streams; all-gather routes tokens alike without them
        **({"moe_token_dispatcher_type": "allgather"} if device.type == "cpu" else {}),
    )
    model = build_moonlight_model(config, arch.vocab_size, arch.max_sequence_length, parallel_output=False)
    path = rank_file(megatron_dir, par, ps.get_tensor_model_parallel_rank(), 0, ps.get_expert_model_parallel_rank())
    state = {k: v.float() if torch.is_tensor(v) else v for k, v in load_rank_model(path).items()}
    result = model.load_state_dict(state, strict=False)
    problems = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("_extra_state")]
    if problems:
        raise KeyError(f"{path} does not match the model built from the spec: {problems[:5]}")
    return model.to(device).eval()


def load_hf_model(hf_dir: Path) -> torch.nn.Module:
    """The transformers reference, float32, eager attention."""
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] logits of a Megatron GPTModel built with parallel_output=False."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=positions, attention_mask=None)


def verify_checkpoint(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    num_tokens: int = 32,
    batch: int = 2,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    device: torch.device = torch.device("cpu"),
) -> VerifyResult:
    """Compare logits; collective over the world set up by ``init_verify_world`` (or a test harness)."""
    hf_dir, megatron_dir = Path(hf_dir), Path(megatron_dir)
    _, hf = read_layout(megatron_dir)
    vocab = int(hf["vocab_size"])
    tokens = torch.randint(0, vocab, (batch, num_tokens), generator=torch.Generator().manual_seed(seed))
    with _cuda_device_named_cpu(device):
        ours = megatron_logits(load_megatron_model(megatron_dir, device), tokens.to(device)).float().cpu()
    stats = torch.zeros(2)
    if dist.get_rank() == 0:
        with torch.no_grad():
            reference = load_hf_model(hf_dir)(input_ids=tokens).logits
        stats = torch.tensor([(ours - reference).abs().max().item(), reference.abs().max().item()])
    stats = stats.to(device)
    dist.broadcast(stats, src=0)
    stats = stats.cpu()
    return VerifyResult(float(stats[0]), float(stats[1]), rtol)
