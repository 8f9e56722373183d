"""Benchmark muon_ds's Megatron optimizer next to megatron-core's Adam on a Moonlight-shaped GPTModel.

Per layout (DP=2 with the distributed optimizer, TP=2, EP=2) and per rank: optimizer step time of
muon_ds's Muon and of Megatron's Adam (same model, same run), Newton-Schulz time and FLOPs, and
the bytes Muon's exchange moves beyond what Megatron already communicates.

    torchrun --nproc-per-node 2 benchmarks/megatron_optimizer.py      # GPUs (NCCL)
    python benchmarks/megatron_optimizer.py                            # CPU: starts 2 gloo ranks itself

On CPU it uses the tests' megatron-core CPU patches (tests/megatron_cpu.py); on GPUs nothing is patched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "moonlight-tiny.config.json"
LAYOUTS = {"DP=2 (dist-opt)": dict(tp=1, ep=1), "TP=2 (+SP, dist-opt)": dict(tp=2, ep=1),
           "EP=2 (dist-opt)": dict(tp=1, ep=2)}


def hf_config(args: argparse.Namespace) -> dict[str, Any]:
    """A Moonlight-shaped config, scaled by the command line (tiny layout, bigger matrices)."""
    hf = json.loads(TINY.read_text())
    hf.update(hidden_size=args.hidden, intermediate_size=args.hidden * 3, moe_intermediate_size=args.hidden // 2,
              n_routed_experts=args.experts, num_hidden_layers=args.layers, kv_lora_rank=args.hidden // 2,
              num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)
    return hf


def build(hf: dict[str, Any], tp: int, ep: int, device: torch.device, backend: str) -> Any:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from muon_ds.models.config import mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)
    config = mla_transformer_config(hf, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                    sequence_parallel=tp > 1, params_dtype=torch.float32,
                                    use_cpu_initialization=device.type == "cpu")
    model = build_moonlight_model(config, hf["vocab_size"], hf["max_position_embeddings"],
                                  backend_name=backend).to(device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    return DistributedDataParallel(config, ddp_config, model)


def fill_grads(ddp: Any) -> None:
    """Random gradients in Megatron's grad buffers (the optimizer step does not depend on how they came)."""
    generator = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    for param in ddp.module.parameters():
        grad = torch.randn(param.shape, generator=generator).to(param.main_grad.device) * 1e-3
        param.main_grad.copy_(grad)


def timed_steps(ddp: Any, optimizer: Any, steps: int, sync: Callable[[], None]) -> float:
    """Seconds per optimizer step (after one warm-up step)."""
    fill_grads(ddp)
    optimizer.step()
    total = 0.0
    for _ in range(steps):
        fill_grads(ddp)
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        total += time.perf_counter() - start
    return total / steps


def measure(hf: dict[str, Any], tp: int, ep: int, steps: int, device: torch.device, backend: str) -> dict[str, float]:
    from megatron.core.optimizer import get_megatron_optimizer as megatron_adam

    import muon_ds.optim as optim_module
    from muon_ds.megatron import get_megatron_optimizer, moonlight_optimizer_config

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Moonlight's Muon settings; "adam" so that megatron-core's own factory builds its Adam from the same config.
    config = moonlight_optimizer_config(optimizer="adam", lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                                        use_distributed_optimizer=True, clip_grad=1.0)
    ddp = build(hf, tp, ep, device, backend)
    adam_seconds = timed_steps(ddp, megatron_adam(config, [ddp]), steps, sync)

    ddp = build(hf, tp, ep, device, backend)
    muon = get_megatron_optimizer(config, [ddp])
    ns_seconds = [0.0]
    original = optim_module.orthogonalize

    def timed_orthogonalize(*args: Any, **kwargs: Any) -> torch.Tensor:
        sync()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        ns_seconds[0] += time.perf_counter() - start
        return out

    optim_module.orthogonalize = timed_orthogonalize
    try:
        muon_seconds = timed_steps(ddp, muon, steps, sync)
    finally:
        optim_module.orthogonalize = original
    layouts = [layout for o in muon.chained_optimizers for layout in o.optimizer.layouts.values()]
    rank = layouts[0].rank
    moved = sum(t.piece.numel for layout in layouts for t in layout.plan.gathers + layout.plan.scatters
                if rank in (t.src, t.dst))
    element = 2  # bf16 Newton-Schulz ("medium" precision)
    return {"adam_ms": 1e3 * adam_seconds, "muon_ms": 1e3 * muon_seconds,
            "ns_ms": 1e3 * ns_seconds[0] / (steps + 1), "ns_gflop": sum(l.plan.flops[rank] for l in layouts) / 1e9,
            "extra_mb": moved * element / 2**20,
            "params_m": sum(p.numel() for p in ddp.module.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", choices=("local", "te"), default="local",
                        help="megatron-core local layers, or TransformerEngine's (GPUs with TE installed)")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # CPU convenience: start two gloo ranks of this script
        sys.path.insert(0, str(REPO))
        from tests.distributed import run_ranks

        outputs = run_ranks(2, "benchmarks.megatron_optimizer", *sys.argv[1:])
        text = next(out for out in outputs if "RESULT " in out)
        table = text[text.index("RESULT ") + 7:].splitlines()
        print("\n".join(line for line in table if line.startswith(("|", "Moonlight"))))
        return
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        sys.path.insert(0, str(REPO))
        from tests import megatron_cpu_optim

        megatron_cpu_optim.apply()
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    hf = hf_config(args)
    rows = []
    for name, layout in LAYOUTS.items():
        stats = measure(hf, layout["tp"], layout["ep"], args.steps, device, args.backend)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, stats)
        rows += [(name, rank, s) for rank, s in enumerate(everyone)]
    if dist.get_rank() == 0:
        lines = [f"Moonlight-shaped GPTModel, hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
                 f"{rows[0][2]['params_m']:.1f} M params per rank (DP layout); {device.type}, "
                 f"{dist.get_world_size()} ranks, NS in bf16",
                 "| layout | rank | Megatron Adam step ms | muon_ds Muon step ms | NS ms | NS GFLOP | extra MiB/step |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {rank} | {s['adam_ms']:.1f} | {s['muon_ms']:.1f} | {s['ns_ms']:.1f} | "
                  f"{s['ns_gflop']:.2f} | {s['extra_mb']:.3f} |" for name, rank, s in rows]
        print("RESULT " + "\n".join(lines), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
