"""muon-ds's Muon vs megatron-core 0.19's native Muon on the same tiny Moonlight: layout invariance, step time, refusals.

    python benchmarks/megatron_native_muon.py

Both optimizers get Moonlight's settings (momentum 0.95 with Nesterov, 0.2 sqrt(max(A, B)) scale, NS in
float32 so only the layout can differ) through ``muon_ds.megatron.moonlight_optimizer_config``; the native one is
built by megatron-core's own ``get_megatron_optimizer``, muon-ds's by ``muon_ds.megatron.get_megatron_optimizer``.
Each trains 3 steps from the same weights on the same batches (tests/megatron_worker.py on CPU/gloo), on 1 rank
and at TP=2 + SP in every TP mode (without the distributed optimizer); the
table gives the largest difference of a Muon matrix between TP=2 and TP=1, relative to the change training made
to it (float32 rounding is ~1e-6), and the time per training step (after the first) on 2 CPU ranks; the same
for DP=2 with the standard distributed optimizer. Then both are asked for the settings Megatron users run
with, and the refusals are listed.

Runs on megatron-core 0.19.2 prepared by tests/megatron_lm.py (downloaded once, with emerging-optimizers).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import megatron_lm  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

WORKER = "tests.megatron_worker"
MODES = ("distributed", "duplicated", "blockwise")
ADAMW = ("embedding", "output_layer", "router", "layernorm", "norm.weight")
REFUSALS = {  # scenario options -> what a user asks for
    "distopt=1": "--use-distributed-optimizer (standard ZeRO-1 sharding)",
    "distopt=0,precision=fp16": "fp16 with loss scaling",
    "distopt=0,precision=bf16": "bf16",
}


def _load(out: Path, name: str) -> dict:
    results = [torch.load(f) for f in sorted(out.glob(f"{name}.rank*.pt"))]
    if "error" in results[0]:
        return {"error": results[0]["error"]}
    weights: dict[str, torch.Tensor] = {}
    for result in results:
        weights.update(result["weights"])
    return {"weights": weights, "initial": results[0]["initial"],
            "seconds": max(r["seconds_per_step"] for r in results)}


def _muon_difference(run: dict, reference: dict) -> float:
    return max(((run["weights"][k] - reference["weights"][k]).abs().max()
                / (reference["weights"][k] - reference["initial"][k]).abs().max().clamp_min(1e-12)).item()
               for k in reference["weights"] if not any(tag in k for tag in ADAMW))


def main() -> None:
    path = [*megatron_lm.pythonpath(megatron_lm.VERSION), megatron_lm.emerging_optimizers()]
    env = {"PYTHONPATH": os.pathsep.join([*(str(p) for p in path), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_ranks(1, WORKER, str(out), "ours_tp1:distopt=0", "native_tp1:distopt=0,native=1", env=env)
        two = [f"ours_{mode}:tp=2,distopt=0,mode={mode}" for mode in ("distributed", "blockwise")]
        two += [f"native_{mode}:tp=2,distopt=0,native=1,mode={mode}" for mode in MODES]
        two += [f"ours_refuse{i}:{options}" for i, options in enumerate(REFUSALS)]
        two += [f"native_refuse{i}:native=1,{options}" for i, options in enumerate(REFUSALS)]
        run_ranks(2, WORKER, str(out), *(spec + ",steps=3" for spec in two), env=env)

        print(f"megatron-core {megatron_lm.VERSION}, tiny Moonlight (tests/data/moonlight-tiny.config.json), "
              "3 steps, 2 CPU ranks (gloo)\n")
        print("| optimizer | layout (2 ranks) | TP mode | vs 1 rank: max rel. diff of a Muon matrix | s/step |")
        print("|---|---|---|---|---|")
        for who, label, modes in (("ours", "muon-ds", ("distributed", "blockwise")), ("native", "megatron-core native", MODES)):
            reference = _load(out, f"{who}_tp1")
            rows = [("TP=2 + SP", mode, f"{who}_{mode}") for mode in modes]
            rows.append(("DP=2, distributed optimizer", "-", f"{who}_refuse0"))
            for layout, mode, name in rows:
                run = _load(out, name)
                if "error" in run or "error" in reference:
                    print(f"| {label} | {layout} | {mode} | refused: {run.get('error') or reference['error']} | - |")
                    continue
                print(f"| {label} | {layout} | {mode} | {_muon_difference(run, reference):.1e} | "
                      f"{run['seconds']:.3f} |")
        print("\n| asked for | muon-ds | megatron-core native |\n|---|---|---|")
        for i, asked in enumerate(REFUSALS.values()):
            cells = [_load(out, f"{who}_refuse{i}") for who in ("ours", "native")]
            print(f"| {asked} | " + " | ".join(f"refused: {c['error']}" if "error" in c else "trains" for c in cells)
                  + " |")


if __name__ == "__main__":
    main()
