"""Two CPU ranks (gloo): logits of the converted model equal transformers' at TP=2 (+SP) and at EP=2;
at TP=2 + SP every gradient, after Megatron's DDP and finalize_model_grads, equals transformers' (the
MLA kv down-projection is where megatron-core's own local spec fails: NVIDIA/Megatron-LM#1699); PP=2
rank files load strictly into each stage; Megatron's distributed optimizer steps on CPU (test support).
One spawn runs every scenario to keep the suite fast."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muon_ds.convert.hf_to_megatron import hf_to_megatron
from muon_ds.convert.layout import Parallelism, hf_shapes
from muon_ds.convert.random_hf import write_random_hf_checkpoint

TINY = json.loads((Path(__file__).parent / "data" / "moonlight-tiny.config.json").read_text())
KV_DOWN_HF = "self_attn.kv_a_proj_with_mqa.weight"


def _hf_file_key_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' gradients under the checkpoint's file keys (it fuses each layer's experts in memory)."""
    grads = {}
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            for e, fused in enumerate(param.grad):
                gate, up = fused.chunk(2)
                grads[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                grads[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif name.endswith("experts.down_proj"):
            for e, grad in enumerate(param.grad):
                grads[name.replace("down_proj", f"{e}.down_proj.weight")] = grad
        else:
            grads[name] = param.grad
    return grads


def _gradient_errors(hf_dir: Path, mg_dir: Path, upstream_spec: bool) -> dict[str, float]:
    """Relative error vs transformers of every gradient at TP=2 + SP, per HF tensor, after Megatron's
    DDP and finalize_model_grads (which all-reduce the replicated sequence-parallel parameters)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from muon_ds.convert import verify
    from muon_ds.convert.layout import COLUMN, rank_entries, unshard
    from muon_ds.models import spec

    par = Parallelism(tp=2)
    entries = rank_entries(TINY, par, 0, 0)
    if upstream_spec:  # megatron-core's local MLA spec: kv down-projection column-parallel
        local = spec._BACKENDS["local"]
        spec._BACKENDS["local"] = lambda: dataclasses.replace(local(), replicated_linear=ColumnParallelLinear)
        original_load = verify.load_rank_model

        def load_column_shards(path: Path) -> dict:
            state = original_load(path)
            rank = dist.get_rank()
            return {k: v.chunk(2)[rank] if k.endswith("linear_kv_down_proj.weight") else v for k, v in state.items()}

        verify.load_rank_model = load_column_shards
        entries = [dataclasses.replace(e, split=COLUMN) if e.hf_keys[0].endswith(KV_DOWN_HF) else e for e in entries]
    try:
        model = verify.load_megatron_model(mg_dir, torch.device("cpu"))
    finally:
        if upstream_spec:
            spec._BACKENDS["local"] = local
            verify.load_rank_model = original_load
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 16, TINY["vocab_size"], generator=torch.Generator().manual_seed(2))
    positions = torch.arange(16).expand_as(tokens)
    (ddp(input_ids=tokens, position_ids=positions, attention_mask=None) * weights).sum().backward()
    finalize_model_grads([ddp])

    reference = verify.load_hf_model(hf_dir)
    (reference(input_ids=tokens).logits * weights).sum().backward()
    expected = _hf_file_key_grads(reference)
    group = parallel_state.get_tensor_model_parallel_group()
    errors = {}
    for entry in entries:
        if entry.megatron_key.endswith("expert_bias"):
            continue  # a buffer, updated from token counts, not by gradient
        grad = model.get_parameter(entry.megatron_key).main_grad
        pieces = [torch.empty_like(grad) for _ in range(2)]
        dist.all_gather(pieces, grad.contiguous(), group=group)
        for key, ours in zip(entry.hf_keys, unshard(pieces, entry.split)):
            ref = expected[key]
            errors[key] = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    return errors


def _pipeline_stage_loads_strictly(pp2_dir: Path) -> int:
    """Build this rank's PP=2 stage from our spec and load its rank file with strict key matching."""
    from megatron.core import parallel_state as ps

    from muon_ds.convert.layout import Parallelism
    from muon_ds.convert.megatron_files import load_rank_model, rank_file
    from muon_ds.models.config import mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model

    par = Parallelism(pp=2, first_stage_layers=1)  # 3 layers: [0] and [1, 2]
    config = mla_transformer_config(TINY, **par.megatron_kwargs(), pipeline_dtype=torch.float32,
                                    use_cpu_initialization=True, perform_initialization=False)
    stage = ps.get_pipeline_model_parallel_rank()
    model = build_moonlight_model(config, TINY["vocab_size"], TINY["max_position_embeddings"],
                                  pre_process=stage == 0, post_process=stage == 1)
    state = load_rank_model(rank_file(pp2_dir, par, 0, stage, 0))
    model.load_state_dict(state, strict=True)
    return len(state)


def _distributed_adam_step() -> list[float]:
    """One Megatron DDP + distributed-optimizer Adam step at DP=2 (exercises tests/megatron_cpu.py's
    optimizer patches); returns a weight fingerprint that must be equal on both DP ranks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from muon_ds.models.config import mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model

    config = mla_transformer_config(TINY, use_cpu_initialization=True)
    model = build_moonlight_model(config, TINY["vocab_size"], TINY["max_position_embeddings"])
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
                                       [ddp])
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    ddp(input_ids=tokens, position_ids=torch.arange(16).expand_as(tokens), attention_mask=None,
        labels=tokens).float().mean().backward()
    finalize_model_grads([ddp])
    updated, _, _ = optimizer.step()
    assert updated
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(model.parameters(), before))
    return [moved, sum(p.detach().double().sum().item() for p in model.parameters())]


def _worker(rank: int, port: int, hf_dir: Path, tp2_dir: Path, ep2_dir: Path, pp2_dir: Path, out: Path) -> None:
    from muon_ds.convert.verify import verify_checkpoint
    from tests import megatron_cpu

    torch.set_num_threads(1)  # two ranks share the machine's cores
    megatron_cpu.init_process(rank, world_size=2, port=port, tp=2)
    results = {"tp2": dataclasses.asdict(verify_checkpoint(hf_dir, tp2_dir, num_tokens=24))}
    results["grad_ours"] = _gradient_errors(hf_dir, tp2_dir, upstream_spec=False)
    results["grad_upstream"] = _gradient_errors(hf_dir, tp2_dir, upstream_spec=True)
    megatron_cpu.reinit_parallel(tp=1, ep=2)
    results["ep2"] = dataclasses.asdict(verify_checkpoint(hf_dir, ep2_dir, num_tokens=24))
    megatron_cpu.reinit_parallel(pp=2)
    results["pp2_keys"] = _pipeline_stage_loads_strictly(pp2_dir)
    megatron_cpu.reinit_parallel()
    results["adam"] = _distributed_adam_step()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    megatron_cpu.shutdown()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests import megatron_cpu

    root = tmp_path_factory.mktemp("parallel")
    hf_dir = write_random_hf_checkpoint(TINY, root / "hf")
    hf_to_megatron(hf_dir, root / "tp2", Parallelism(tp=2), progress=False)
    hf_to_megatron(hf_dir, root / "ep2", Parallelism(ep=2), progress=False)
    hf_to_megatron(hf_dir, root / "pp2", Parallelism(pp=2, first_stage_layers=1), progress=False)
    port = megatron_cpu.free_port()
    mp.spawn(_worker, args=(port, hf_dir, root / "tp2", root / "ep2", root / "pp2", root), nprocs=2)
    return {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in range(2)}


def _tp2_ep2_worker(rank: int, port: int, hf_dir: Path, mg_dir: Path, out: Path) -> None:
    from muon_ds.convert.verify import verify_checkpoint
    from tests import megatron_cpu

    torch.set_num_threads(1)
    megatron_cpu.init_process(rank, world_size=4, port=port, tp=2, ep=2)
    result = dataclasses.asdict(verify_checkpoint(hf_dir, mg_dir, num_tokens=24))
    (out / f"tp2ep2-rank{rank}.json").write_text(json.dumps(result))
    megatron_cpu.shutdown()


def test_tp2_ep2_logits_equal_transformers(tmp_path: Path) -> None:
    """Four ranks: experts split over EP and, within each, over TP (expert TP = TP)."""
    from tests import megatron_cpu

    hf_dir = write_random_hf_checkpoint(TINY, tmp_path / "hf")
    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(tp=2, ep=2), progress=False)
    mp.spawn(_tp2_ep2_worker, args=(megatron_cpu.free_port(), hf_dir, tmp_path / "mg", tmp_path), nprocs=4)
    result = json.loads((tmp_path / "tp2ep2-rank0.json").read_text())
    assert _passed(result), result


def _passed(result: dict) -> bool:
    return result["max_abs_diff"] <= result["rtol"] * result["max_abs_logit"]


def test_tp2_logits_equal_transformers(results: dict) -> None:
    assert _passed(results[0]["tp2"]), results[0]["tp2"]


def test_ep2_logits_equal_transformers(results: dict) -> None:
    assert _passed(results[0]["ep2"]), results[0]["ep2"]


def test_tp2_gradients_equal_transformers(results: dict) -> None:
    errors = results[0]["grad_ours"]
    trained = [key for key in hf_shapes(TINY) if not key.endswith("e_score_correction_bias")]
    assert sorted(errors) == sorted(trained)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, (worst, errors[worst])


def test_upstream_column_parallel_kv_down_gets_the_gradient_wrong(results: dict) -> None:
    # The negative control (NVIDIA/Megatron-LM#1699): megatron-core's own local MLA spec fails the check
    # above, starting with the kv down-projection of every layer (the error then reaches earlier layers).
    errors = results[0]["grad_upstream"]
    wrong = {key for key, error in errors.items() if error > 1e-2}
    assert {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight" for i in range(3)} <= wrong


def test_pp2_rank_files_match_the_stage_models_exactly(results: dict) -> None:
    assert results[0]["pp2_keys"] > 0 and results[1]["pp2_keys"] > 0


def test_cpu_support_runs_megatrons_distributed_optimizer(results: dict) -> None:
    assert results[0]["adam"][0] > 0  # weights moved
    assert results[0]["adam"] == results[1]["adam"]  # and stayed identical on both data-parallel ranks
