"""The ``muon-ds`` command: argparse subcommand groups, each added by a function listed in ``_GROUPS``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from muon_ds.convert.hf_to_megatron import hf_to_megatron
    from muon_ds.convert.layout import Parallelism

    par = Parallelism(args.tp, args.pp, args.ep, args.decoder_first_pipeline_num_layers,
                      args.decoder_last_pipeline_num_layers)
    report = hf_to_megatron(args.hf, args.out, par, progress=not args.quiet)
    print(f"wrote {report.files} rank file(s) to {report.output}; peak RSS {report.peak_rss_gib:.2f} GiB")
    return 0


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from muon_ds.convert.megatron_to_hf import megatron_to_hf

    report = megatron_to_hf(args.megatron, args.out, int(args.max_shard_gib * 2**30), progress=not args.quiet)
    print(f"wrote {report.tensors} tensors in {report.files} shard(s) to {report.output}; "
          f"peak RSS {report.peak_rss_gib:.2f} GiB")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import torch
    from megatron.core import parallel_state

    from muon_ds.convert.megatron_files import read_layout
    from muon_ds.convert.verify import init_verify_world, verify_checkpoint

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    par, _ = read_layout(Path(args.megatron))
    if not parallel_state.model_parallel_is_initialized():  # a launcher may have set it up already
        init_verify_world(par.tp, par.ep, device)
    result = verify_checkpoint(args.hf, args.megatron, num_tokens=args.tokens, seed=args.seed, rtol=args.rtol,
                               device=device)
    verdict = "OK" if result.passed else "FAILED"
    print(f"max |logit difference| = {result.max_abs_diff:.3e} (largest |logit| {result.max_abs_logit:.3f}, "
          f"allowed {result.rtol:.1e} x that): {verdict}")
    return 0 if result.passed else 1


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from muon_ds.convert.verify import DEFAULT_RTOL

    convert = sub.add_parser("convert", help="Moonlight checkpoints: HF <-> Megatron, and verification")
    steps = convert.add_subparsers(dest="step", required=True)

    p = steps.add_parser("hf-to-megatron", help="HF safetensors directory -> Megatron per-rank checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + sharded safetensors)")
    p.add_argument("--out", required=True, help="new Megatron checkpoint directory (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (also the expert TP size)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers on the first stage (as Megatron-LM's flag); the rest split evenly")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers on the last stage (as Megatron-LM's flag)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_hf_to_megatron)

    p = steps.add_parser("megatron-to-hf", help="Megatron checkpoint written by hf-to-megatron -> HF directory")
    p.add_argument("--megatron", required=True, help="Megatron checkpoint directory")
    p.add_argument("--out", required=True, help="new HF model directory (must not exist)")
    p.add_argument("--max-shard-gib", type=float, default=4.0, help="largest safetensors shard, GiB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_megatron_to_hf)

    p = steps.add_parser("verify", help="Megatron logits (our spec) vs transformers' DeepseekV3ForCausalLM")
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--megatron", required=True, help="converted Megatron checkpoint (PP=1); run under "
                   "torchrun with TP x EP processes when it was converted with TP or EP > 1")
    p.add_argument("--tokens", type=int, default=32, help="sequence length of the random test batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="allowed difference / largest |logit|")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.set_defaults(run=_verify)


_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand group."""
    parser = argparse.ArgumentParser(prog="muon-ds", description="Moonlight's Muon for DeepSpeed and Megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _GROUPS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. Errors print one line naming the problem."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError) as err:  # OSError: missing, existing or unwritable files
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        print(f"muon-ds: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
