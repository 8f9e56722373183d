"""A model of Moonlight-16B-A3B's optimizer step at scale, from muon_ds's own exchange plans on the real shapes.

For W GPUs (DP x EP as Moonlight trained: dense weights data-parallel over all W, experts split over EP
ranks and data-parallel over W / EP), ZeRO-1 (flat partitions of each group, in model order) and ZeRO-3
(every parameter cut into W equal pieces), it builds the plan ``muon_ds.plan`` would build and prints per
rank (the worst one): Newton-Schulz FLOPs and time, exchange bytes (intra-node over NVLink, inter-node
over InfiniBand), the step time with the overlap as built (the gather travels while the matrices that need
nothing from peers are orthogonalized), and the optimizer's share of a training step at Moonlight's
batch size; next to DeepSpeed's built-in Muon, where every rank orthogonalizes every matrix its
partition touches (all of them at ZeRO-3). Every assumption is printed and is a flag.

    python benchmarks/scaling_model.py [--ns-tflops 376] [--worlds 8,64,512,1024] [--ep 8]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from newton_schulz import DEFAULT_CONFIG, moonlight_shapes  # benchmarks/newton_schulz.py

from muon_ds.matrices import MatrixView
from muon_ds.newton_schulz import ns_flops
from muon_ds.partition import partitioned_layout
from muon_ds.plan import ExchangePlan, Holding, Matrix, Piece, make_plan

GPUS_PER_NODE = 8


def groups(config: dict, ep: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(dense matrices, one expert-parallel rank's expert matrices), in model order."""
    shapes = moonlight_shapes(config)
    experts = config["n_routed_experts"]
    expert_shapes = Counter({(config["moe_intermediate_size"], config["hidden_size"]): 2 * experts,
                             (config["hidden_size"], config["moe_intermediate_size"]): experts})
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    expert_shapes = Counter({s: n * moe_layers for s, n in expert_shapes.items()})
    dense = shapes - expert_shapes
    mine = [s for s, n in sorted(expert_shapes.items()) for _ in range(n // ep)]
    return [s for s, n in sorted(dense.items()) for _ in range(n)], mine


def zero1_plan(shapes: list[tuple[int, int]], world: int) -> ExchangePlan:
    views = [MatrixView.whole(f"m{i}", s) for i, s in enumerate(shapes)]
    spans, offset = [], 0
    for view in views:
        spans.append((view, offset))
        offset += view.numel
    return partitioned_layout(spans, -(-offset // world), 0, world, 5).plan


def zero3_plan(shapes: list[tuple[int, int]], world: int) -> ExchangePlan:
    matrices, holdings = [], []
    for i, (rows, cols) in enumerate(shapes):
        view = MatrixView.whole(f"m{i}", (rows, cols))
        matrices.append(Matrix(view.key, view.shape))
        size = -(-view.numel // world)
        for r in range(world):
            lo, hi = r * size, min(view.numel, (r + 1) * size)
            if lo < hi:
                holdings.append(Holding(r, Piece(view.key, view.block, lo, hi)))
    return make_plan(matrices, holdings, world, 5)


def per_rank(plan: ExchangePlan, element_size: int, stride: int = 1) -> dict[str, list[float]]:
    """Per rank: NS FLOPs (all, and of matrices needing no receive), bytes in and out, intra/inter node.

    Rank r of the plan's group is global rank r x ``stride`` (an expert-data-parallel group takes every
    EP-th rank, so it spans nodes)."""
    world = plan.world_size
    arriving = {(t.dst, t.piece.key) for t in plan.gathers}
    local = [0] * world
    for key, matrix in plan.matrices.items():
        if (plan.owner[key], key) not in arriving:
            local[plan.owner[key]] += ns_flops(matrix.shape)
    stats = {"flops": list(plan.flops), "local_flops": local, "gather_intra": [0] * world,
             "gather_inter": [0] * world, "scatter_intra": [0] * world, "scatter_inter": [0] * world}
    for name, transfers in (("gather", plan.gathers), ("scatter", plan.scatters)):
        for t in transfers:
            link = "intra" if t.src * stride // GPUS_PER_NODE == t.dst * stride // GPUS_PER_NODE else "inter"
            for rank in (t.src, t.dst):  # each end moves it once (send or receive)
                stats[f"{name}_{link}"][rank] += t.piece.numel * element_size
    return stats


def seconds(stats: dict[str, list[float]], rank: int, args: argparse.Namespace) -> dict[str, float]:
    ns = stats["flops"][rank] / (args.ns_tflops * 1e12)
    local = stats["local_flops"][rank] / (args.ns_tflops * 1e12)

    def link(name: str) -> float:  # a send and a receive share neither direction: half the bytes each way
        return max(stats[f"{name}_intra"][rank] / 2 / (args.nvlink_gbs * 1e9),
                   stats[f"{name}_inter"][rank] / 2 / (args.ib_gbits / 8 * 1e9))

    gather, scatter = link("gather"), link("scatter")
    return {"ns": ns, "gather": gather, "scatter": scatter,
            "step": max(gather, local) + (ns - local) + scatter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--worlds", default="8,64,512,1024")
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel size (experts split over EP ranks)")
    parser.add_argument("--ns-tflops", type=float, default=590.2 / 1.57,
                        help="achieved bf16 NS throughput per GPU (default: 590.2 TFLOP in 1.57 s, batched, "
                             "one H100, the brief's figure; pass a measured one)")
    parser.add_argument("--builtin-tflops", type=float, default=590.2 / 1.57,
                        help="the built-in Muon's NS throughput (fp16; default: the same)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak of one GPU (H200)")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilization of forward+backward")
    parser.add_argument("--batch-tokens", type=float, default=16.8e6, help="tokens per optimizer step")
    parser.add_argument("--activated", type=float, default=2.24e9, help="activated non-embedding parameters")
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per direction per GPU")
    parser.add_argument("--ib-gbits", type=float, default=400.0, help="InfiniBand Gb/s per GPU")
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM TB/s (elementwise work)")
    parser.add_argument("--elementwise-bytes", type=float, default=30.0,
                        help="bytes of memory traffic per local Muon element for momentum, Nesterov, apply")
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    dense, experts = groups(config, args.ep)
    total_flops = sum(ns_flops(s) for s in dense) + args.ep * sum(ns_flops(s) for s in experts)
    print("Assumptions (flags): " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in vars(args).items() if k != "config"))
    print(f"Moonlight-16B-A3B: {len(dense) + args.ep * len(experts)} matrices, NS {total_flops / 1e12:.1f} TFLOP "
          f"per step (bf16 exchange, 2 bytes/element); {GPUS_PER_NODE} GPUs per node; the forward+backward of "
          "a step: 6 x activated parameters x batch tokens / (W x MFU x peak)")
    print("| W | ZeRO | NS TFLOP/rank | NS s | gather MB/rank (intra / inter) | scatter MB/rank | optimizer step s "
          "| share of a training step | DeepSpeed built-in: NS s, share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in map(int, args.worlds.split(",")):
        compute = 6 * args.activated * args.batch_tokens / (world * args.mfu * args.peak_tflops * 1e12)
        for stage, build in (("1", zero1_plan), ("3", zero3_plan)):
            d = per_rank(build(dense, world), 2)
            e = per_rank(build(experts, world // args.ep), 2, args.ep) if world >= args.ep else None
            rank = max(range(world), key=lambda r: d["flops"][r] + (e["flops"][r % len(e["flops"])] if e else 0))
            t = seconds(d, rank, args)
            if e is not None:
                te = seconds(e, rank % len(e["flops"]), args)
                t = {k: t[k] + te[k] for k in t}
            local_elements = (sum(a * b for a, b in dense) / world
                              + (sum(a * b for a, b in experts) / (world // args.ep) if e else 0))
            step = t["step"] + local_elements * args.elementwise_bytes / (args.hbm_tbs * 1e12)
            flops = d["flops"][rank] + (e["flops"][rank % len(e["flops"])] if e else 0)
            mb = {k: (d[k][rank] + (e[k][rank % len(e[k])] if e else 0)) / 1e6
                  for k in ("gather_intra", "gather_inter", "scatter_intra", "scatter_inter")}
            builtin = builtin_flops(dense, experts, world, args.ep, stage) / (args.builtin_tflops * 1e12)
            print(f"| {world} | {stage} | {flops / 1e12:.2f} | {t['ns']:.3f} | {mb['gather_intra']:.0f} / "
                  f"{mb['gather_inter']:.0f} | {mb['scatter_intra'] + mb['scatter_inter']:.0f} | {step:.3f} | "
                  f"{100 * step / (compute + step):.2f}% | {builtin:.3f} s, "
                  f"{100 * builtin / (compute + builtin):.1f}% |", flush=True)
    print("Moonlight's paper reports its distributed Muon at 1-3% of a training step.")


def builtin_flops(dense: list, experts: list, world: int, ep: int, stage: str) -> float:
    """NS FLOPs of the worst rank under DeepSpeed's built-in Muon: every matrix its partition touches
    (ZeRO-1: flat partitions in model order; ZeRO-3: every matrix, each rank gathers them all)."""
    def worst(shapes: list, ranks: int) -> float:
        if stage == "3" or ranks == 1:
            return sum(ns_flops(s) for s in shapes)
        total = sum(a * b for a, b in shapes)
        size = -(-total // ranks)
        load, offset = [0.0] * ranks, 0
        for shape in shapes:
            numel = shape[0] * shape[1]
            for r in range(offset // size, (offset + numel - 1) // size + 1):
                load[r] += ns_flops(shape)
            offset += numel
        return max(load)

    return worst(dense, world) + (worst(experts, world // ep) if world >= ep else 0)


if __name__ == "__main__":
    main()
