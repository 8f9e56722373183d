"""Megatron-LM's own ``pretrain_gpt.py`` trains the tiny Moonlight with ``--optimizer muon`` on 2 CPU ranks, on
megatron-core 0.16.1 (Megatron-LM core_v0.16.1) and 0.19.2 (core_v0.19.0), through the launcher and the patch.

Every launch uses ``--moonlight-config`` (the HF config checked against the tiny arguments), bf16 and the
distributed optimizer. Layouts: DP=2 with overlapped grad reduce / param gather, TP=2 + SP, EP=2, PP=2; each
trains 4 iterations saving at 2 and 4, then a second launch resumes from iteration 2 (as a preempted job
would) and saves at 4: every tensor of that checkpoint must equal the uninterrupted run's, bit for bit. The
checkpoint format alternates between layouts (and is swapped on the other release), so both ``torch`` and
``torch_dist`` run on both releases. One layout's uninterrupted run goes through the patched scripts
(patches/), the rest through ``python -m muon_ds.megatron.launch``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("megatron.core")

from tests import megatron_lm  # noqa: E402
from tests.distributed import REPO, run_ranks  # noqa: E402

TINY_HF = REPO / "tests" / "data" / "moonlight-tiny.config.json"
COMMON = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--lr", "1e-3",
          "--lr-decay-style", "constant",  # a linear decay over 4 iterations would make the last step a no-op
          "--train-iters", "4", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
          "--save-interval", "2", "--transformer-impl", "local", "--use-cpu-initialization", "--bf16",
          "--tokenizer-type", "NullTokenizer", "--mock-data", "--moonlight-config", str(TINY_HF),
          "--use-distributed-optimizer", "--distributed-backend", "gloo",
          # CPU: no CUDA extensions, no device RNG to checkpoint, no result-validation reruns (they save it)
          "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-save-rng", "--no-load-rng",
          "--rerun-mode", "disabled"]
LAYOUTS = {
    "dp2": ["--overlap-grad-reduce", "--overlap-param-gather"],
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2"],  # 3 layers: 2 + 1
}
FORMATS = ("torch_dist", "torch")
PATCHED = "ep2"  # the layout whose uninterrupted run uses the patched training scripts
PATCHES = {megatron_lm.VERSION_016: "megatron-lm-core_v0.16.1-muon_ds.patch",
           megatron_lm.VERSION: "megatron-lm-core_v0.19.0-muon_ds.patch"}
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+|nan|inf)")

pytestmark = pytest.mark.skipif(not megatron_lm.ARCHIVES.is_dir(),
                                reason=f"Megatron-LM training-script archives not found at {megatron_lm.ARCHIVES} "
                                       "(set MEGATRON_LM_ARCHIVES)")


def _tiny_args() -> list[str]:
    """The tiny Moonlight's Megatron-LM arguments, as a launch script sourcing the args file gets them."""
    path = REPO / "configs" / "megatron" / "moonlight-tiny.args.sh"
    out = subprocess.run(["bash", "-c", f'source "{path}"; printf "%s\\n" "${{MOONLIGHT_TINY_ARGS[@]}}"'],
                         check=True, capture_output=True, text=True).stdout
    return out.split("\n")[:-1]


def checkpoint_format(version: str, layout: str) -> str:
    index = list(LAYOUTS).index(layout) + megatron_lm.VERSIONS.index(version)
    return FORMATS[index % 2]


def _losses(output: str) -> dict[int, float]:
    return {int(it): float(loss) for it, loss in LOSS.findall(output)}


class Runs:
    """The launches of one release, run once per test module and shared by its tests."""

    def __init__(self, version: str, root: Path) -> None:
        self.version, self.root = version, root
        self.pythonpath = [str(p) for p in megatron_lm.pythonpath(version, triton=True)]
        self.launcher_tree = megatron_lm.training_scripts(version, root / "scripts")
        self.patched_tree = megatron_lm.training_scripts(version, root / "patched")
        subprocess.run(["git", "apply", str(REPO / "patches" / PATCHES[version])], cwd=self.patched_tree, check=True)
        self.losses: dict[str, dict[int, float]] = {}
        self.comparisons: dict[str, dict[str, Any]] = {}

    def _train(self, route: str, layout: str, save: Path, load: Path | None = None) -> dict[int, float]:
        tree = self.patched_tree if route == "patched" else self.launcher_tree
        args = [*_tiny_args(), *COMMON, *LAYOUTS[layout], "--ckpt-format", checkpoint_format(self.version, layout),
                "--save", str(save), *(["--load", str(load)] if load else [])]
        env = {"PYTHONPATH": os.pathsep.join([*self.pythonpath, os.environ.get("PYTHONPATH", "")])}
        outputs = run_ranks(2, "tests.pretrain_gpt_worker", route, str(tree), *args, env=env, timeout=600)
        return _losses(outputs[-1])  # Megatron logs the loss on the last rank

    def run(self, layout: str) -> None:
        full, resumed = self.root / layout / "full", self.root / layout / "resumed"
        self.losses[layout] = self._train("patched" if layout == PATCHED else "launch", layout, full)
        resumed.mkdir(parents=True)  # what a job preempted after iteration 2 leaves behind
        shutil.copytree(full / "iter_0000002", resumed / "iter_0000002")
        (resumed / "latest_checkpointed_iteration.txt").write_text("2")
        self.losses[f"{layout}_resumed"] = self._train("launch", layout, resumed, load=resumed)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*self.pythonpath, str(REPO)]))
        out = subprocess.run([sys.executable, "-m", "tests.pretrain_gpt_worker", "compare",
                              str(full / "iter_0000004"), str(resumed / "iter_0000004")],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-4000:]
        self.comparisons[layout] = json.loads(next(line for line in out.stdout.splitlines()
                                                   if line.startswith("COMPARE "))[8:])


@pytest.fixture(scope="module", params=megatron_lm.VERSIONS, ids=lambda v: f"megatron-core-{v}")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    result = Runs(request.param, tmp_path_factory.mktemp(f"pretrain_gpt_{request.param}"))
    for layout in LAYOUTS:
        result.run(layout)
    return result


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_are_finite_and_falling(runs: Runs, layout: str) -> None:
    losses = runs.losses[layout]
    assert sorted(losses) == [1, 2, 3, 4], losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert losses[4] < losses[1], losses
    # the resumed launch's first iteration has the uninterrupted run's loss (Megatron-LM then logs the average
    # since the resumption, so later iterations are checked through the checkpoint instead)
    assert runs.losses[f"{layout}_resumed"][3] == losses[3]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_equals_the_uninterrupted_run(runs: Runs, layout: str) -> None:
    comparison = runs.comparisons[layout]
    assert comparison["tensors"] > 50, comparison  # model weights, fp32 main params, Muon/AdamW state
    assert comparison["only_one"] == [] and comparison["differ"] == [], comparison


def test_both_checkpoint_formats_and_both_routes_ran(runs: Runs) -> None:
    assert {checkpoint_format(runs.version, layout) for layout in LAYOUTS} == set(FORMATS)
    assert set(runs.losses) == {*LAYOUTS, *(f"{layout}_resumed" for layout in LAYOUTS)}
