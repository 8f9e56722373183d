"""Benchmark: muon_ds's Muon vs DeepSpeed's AdamW and built-in Muon under ZeRO-1 and ZeRO-3, at W = 1, 2, 4.

``python benchmarks/deepspeed_optimizer.py [--stages 1,3] [--worlds 1,2,4]`` launches each configuration
with torchrun on this machine and prints a markdown table: iteration and optimizer-step time, per-rank
Newton-Schulz time and FLOPs, bytes communicated per step beyond AdamW's, optimizer-state memory per rank, and the
iteration-time ratio to AdamW measured in the same run (Newton-Schulz is timed in iterations of its own, after
the timed ones, so that its timers cannot slow them). DeepSpeed's built-in Muon runs in processes
where muon_ds is not activated (``MUON_DS_AUTOLOAD=0``, no import), so the name "Muon" is its own.

The default model is examples/deepspeed/tiny_gpt.py's byte-level GPT in fp32 on CPU (gloo).
``--model llama --bf16`` is a TinyLlama-1.1B-shaped Llama (transformers' LlamaForCausalLM, random init;
sizes overridable) in DeepSpeed's bf16; on a machine with CUDA every rank takes one GPU (nccl).
``--ns-compile`` adds a row for muon_ds's Muon with ``"ns_compile": true`` (Newton-Schulz through torch.compile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SIZES = ("width", "layers", "ffn", "heads", "kv_heads", "vocab", "seq_len", "micro_batch")  # flags per model
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
               "all_gather", "reduce_scatter", "_all_gather_base", "_reduce_scatter_base")
OPTIMIZERS = ("adamw", "muon_ds", "deepspeed_muon", "muon_ds_compiled")  # run in this order
NS_ITERATIONS = 2  # iterations timing Newton-Schulz, after the timed ones
# --model llama's defaults: TinyLlama-1.1B's shape, and its micro-batch of 8 x 2048 tokens per GPU
LLAMA = {"width": 2048, "layers": 22, "ffn": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000, "seq_len": 2048,
         "micro_batch": 8}
GPT = {"width": 512, "layers": 8, "heads": 8, "seq_len": 128, "micro_batch": 2}  # byte-level: vocab 256


def count_collectives(counter: dict[str, int]) -> None:
    """Add up the bytes each collective is given, by wrapping torch.distributed's functions."""
    import torch
    import torch.distributed as dist

    def wrap(fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
            counter["bytes"] += max((t.numel() * t.element_size() for t in tensors), default=0)
            return fn(*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name)))


class NewtonSchulzClock:
    """The seconds and FLOPs spent in Newton-Schulz on this rank. On CUDA, events around each call, read after
    the iteration's synchronize (a host clock would time the launches; a synchronize per call would
    serialize the step being measured)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds, self.flops = 0.0, 0.0
        self.pending: list[tuple[Any, Any]] = []

    def reset(self) -> None:
        self.seconds, self.flops, self.pending = 0.0, 0.0, []

    def settle(self) -> None:
        """Add the timed events (call after a device synchronize)."""
        self.seconds += sum(start.elapsed_time(end) for start, end in self.pending) / 1e3
        self.pending = []

    def wrap(self, fn: Callable) -> Callable:
        import torch
        from muon_ds.newton_schulz import ns_flops

        def timed(g: Any, *args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(g, *args, **kwargs)
                end.record()
                self.pending.append((start, end))
            else:
                begin = time.perf_counter()
                out = fn(g, *args, **kwargs)
                self.seconds += time.perf_counter() - begin
            count = g.shape[0] if g.ndim == 3 else 1
            self.flops += count * ns_flops(tuple(g.shape[-2:]), kwargs.get("steps", 5))
            return out

        return torch.compiler.disable(timed)  # eager also inside a compiled caller (the built-in's muon_update)


def time_newton_schulz(clock: NewtonSchulzClock, optimizer: str) -> None:
    """Time every Newton-Schulz call of ``optimizer`` on this rank.

    FLOPs are those of the standard quintic iteration on the same matrices (DeepSpeed's built-in
    Muon defaults to a Gram-space variant, so for it the figure is the equivalent work).
    """
    timed = clock.wrap
    if optimizer in ("muon_ds", "muon_ds_compiled"):
        import muon_ds.optim as optim

        optim.orthogonalize = timed(optim.orthogonalize)
    else:
        from deepspeed.runtime.zero.muon import original_muon

        for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
            setattr(original_muon, name, timed(getattr(original_muon, name)))


def build_llama(args: argparse.Namespace, device: Any) -> Any:
    """transformers' LlamaForCausalLM from a LlamaConfig (random init, nothing downloaded), wrapped so that its
    forward takes (batch, seq) tokens and returns the next-token loss, as TinyGPT's does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")

    class LlamaLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with device:  # initialized where it runs: a 1.1B model's CPU init would take longer than the run
                self.llama = LlamaForCausalLM(config)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.llama(input_ids=tokens, labels=tokens, use_cache=False).loss

    return LlamaLoss()


def build_model(args: argparse.Namespace, device: Any) -> Any:
    if args.model == "llama":
        return build_llama(args, device)
    from examples.deepspeed.tiny_gpt import TinyGPT

    return TinyGPT(args.width, args.layers, heads=args.heads, seq_len=args.seq_len)


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    if args.optimizer in ("muon_ds", "muon_ds_compiled"):
        import muon_ds  # noqa: F401

    cuda = torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        if int(os.environ["LOCAL_WORLD_SIZE"]) > torch.cuda.device_count():
            raise RuntimeError(f"{os.environ['LOCAL_WORLD_SIZE']} ranks on {torch.cuda.device_count()} GPU(s): "
                               "--worlds must not exceed the GPUs of this machine")
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    comm = {"bytes": 0}
    clock = NewtonSchulzClock(cuda)
    torch.manual_seed(0)
    model = build_model(args, device)
    name = "AdamW" if args.optimizer == "adamw" else "Muon"
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "optimizer": {"type": name, "params": {"lr": 1e-3, "weight_decay": 0.1}},
              "zero_optimization": {"stage": args.stage}}
    if args.bf16:
        config["bf16"] = {"enabled": True}
    if args.optimizer == "muon_ds_compiled":
        config["optimizer"]["params"]["ns_compile"] = True
    if args.torch_adam and args.optimizer in ("adamw", "deepspeed_muon"):  # their Adam: torch's, not FusedAdam
        config["optimizer"]["params"]["torch_adam"] = True
    if args.optimizer == "deepspeed_muon":
        config["optimizer"]["params"]["momentum"] = 0.95
        if args.stage == 3:  # the built-in refuses ZeRO-3's reduce-scatter
            config["zero_optimization"]["reduce_scatter"] = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    built = type(engine.basic_optimizer).__name__
    expected = {"adamw": ("FusedAdam", "AdamW"), "muon_ds": ("Muon",), "muon_ds_compiled": ("Muon",),
                "deepspeed_muon": ("MuonWithAuxAdam",)}
    if built not in expected[args.optimizer]:
        raise RuntimeError(f"--optimizer {args.optimizer} built DeepSpeed's {built}")
    count_collectives(comm)
    length = args.seq_len + (args.model == "gpt")  # TinyGPT predicts tokens[1:], Llama shifts its labels itself
    tokens = torch.randint(0, args.vocab or 256, (args.micro_batch, length),
                           generator=torch.Generator().manual_seed(dist.get_rank())).to(engine.device)

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def iterate() -> tuple[float, float]:
        """(iteration seconds, optimizer-step seconds)"""
        dist.barrier()
        start = now()
        engine.backward(engine(tokens))
        before_step = now()
        engine.step()
        end = now()
        return end - start, end - before_step

    for _ in range(args.warmup):
        iterate()
    comm["bytes"] = 0
    iteration, step_time = zip(*(iterate() for _ in range(args.steps)))
    comm_bytes = comm["bytes"]
    # Newton-Schulz is timed in iterations of its own: its timers break the built-in's compiled muon_update into
    # pieces (graph breaks), which must not slow the iterations timed above. One more warm-up recompiles those.
    if args.optimizer != "adamw":
        time_newton_schulz(clock, args.optimizer)
        for i in range(1 + NS_ITERATIONS):
            if i == 1:
                clock.reset()
            iterate()
            clock.settle()
    basic = engine.basic_optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in basic.state.values() for t in s.values()
                      if torch.is_tensor(t))
    result = {"optimizer": args.optimizer, "stage": args.stage, "world": dist.get_world_size(),
              "rank": dist.get_rank(), "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
              "iteration_s": sum(iteration) / len(iteration), "step_s": sum(step_time) / len(step_time),
              "ns_s": clock.seconds / NS_ITERATIONS, "ns_gflop": clock.flops / NS_ITERATIONS / 1e9,
              "comm_mb": comm_bytes / args.steps / 2**20, "state_mb": state_bytes / 2**20}
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def launch(stage: int, world: int, optimizer: str, args: argparse.Namespace, out: Path) -> None:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # the GPU checks' wheels too
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    if optimizer == "deepspeed_muon":
        env["MUON_DS_AUTOLOAD"] = "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", "--optimizer", optimizer, "--stage", str(stage), "--out", str(out),
           "--model", args.model, *(["--bf16"] if args.bf16 else []), *(["--torch-adam"] if args.torch_adam else []),
           "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    cmd += [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in SIZES if getattr(args, key) is not None]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def table(rows: list[dict[str, Any]], stages: list[int], worlds: list[int]) -> str:
    lines = ["| ZeRO | W | optimizer | iteration s | x AdamW | step s | NS s/rank (max) | NS GFLOP/rank (max) "
             "| comm MB/step/rank beyond AdamW | state MB/rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, world in ((s, w) for s in stages for w in worlds):
        by = {o: [r for r in rows if (r["stage"], r["world"], r["optimizer"]) == (stage, world, o)] for o in OPTIMIZERS}
        if not by["adamw"]:
            continue
        base = max(r["iteration_s"] for r in by["adamw"])
        base_comm = max(r["comm_mb"] for r in by["adamw"])
        for optimizer in OPTIMIZERS:
            rs = by[optimizer]
            if not rs:
                continue
            it = max(r["iteration_s"] for r in rs)
            lines.append(f"| {stage} | {world} | {optimizer} | {it:.3f} | {it / base:.2f} "
                         f"| {max(r['step_s'] for r in rs):.3f} "
                         f"| {max(r['ns_s'] for r in rs):.3f} | {max(r['ns_gflop'] for r in rs):.2f} "
                         f"| {max(r['comm_mb'] for r in rs) - base_comm:.2f} | {max(r['state_mb'] for r in rs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,3")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=("gpt", "llama"), default="gpt",
                        help="gpt: examples/deepspeed/tiny_gpt.py; llama: TinyLlama-1.1B's shape by default")
    parser.add_argument("--bf16", action="store_true", help='DeepSpeed\'s "bf16": {"enabled": true}')
    parser.add_argument("--ns-compile", action="store_true",
                        help='also run muon_ds with "ns_compile": true (row muon_ds_compiled)')
    parser.add_argument("--torch-adam", action="store_true",
                        help="AdamW and the built-in Muon's Adam as torch.optim.AdamW (DeepSpeed's torch_adam), "
                             "not DeepSpeed's FusedAdam (a CUDA extension built at first use)")
    for key in SIZES:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int,
                            help=f"default: gpt {GPT.get(key, '-')}, llama {LLAMA[key]}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = LLAMA if args.model == "llama" else GPT
    fixed = sorted(k for k in SIZES if k not in defaults and getattr(args, k) is not None)
    if fixed:
        parser.error(f"--model {args.model} has no {', '.join('--' + k.replace('_', '-') for k in fixed)}")
    for key in SIZES:
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key))
    if args.worker:
        return worker(args)
    worlds = [int(w) for w in args.worlds.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    out = Path(args.out or "/tmp/muon_ds_benchmark.jsonl")
    out.unlink(missing_ok=True)
    optimizers = [o for o in OPTIMIZERS if o != "muon_ds_compiled" or args.ns_compile]
    failed = False
    for stage in stages:
        for world in worlds:
            for optimizer in optimizers:
                try:
                    launch(stage, world, optimizer, args, out)
                except subprocess.CalledProcessError as err:
                    failed = True
                    print(f"ZeRO-{stage} W={world} {optimizer} failed:\n{err.stderr.decode()[-2000:]}", file=sys.stderr)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not rows:
        sys.exit("no configuration ran")
    print(f"model: {describe(args)}{rows[0]['params'] / 1e6:.1f}M parameters, {'bf16' if args.bf16 else 'fp32'}, "
          f"micro-batch {args.micro_batch} x {args.seq_len} tokens per rank, {hardware()}"
          f"{', torch.optim.AdamW as the Adam (--torch-adam)' if args.torch_adam else ''}")
    print(table(rows, stages, worlds))
    if failed:
        sys.exit("some configurations failed (above)")


def describe(args: argparse.Namespace) -> str:
    if args.model == "gpt":
        return ""
    return (f"Llama ({args.layers} layers, hidden {args.width}, SwiGLU {args.ffn}, {args.heads} heads, "
            f"{args.kv_heads} KV heads, vocab {args.vocab}, RMSNorm), ")


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, nccl"
    return f"{os.cpu_count()} CPU cores, gloo"


if __name__ == "__main__":
    main()
