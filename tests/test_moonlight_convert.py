"""HF <-> Megatron conversion without running a model: lossless round trips, and clear refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from muon_ds.cli import main
from muon_ds.convert.hf_files import INDEX_NAME
from muon_ds.convert.hf_to_megatron import hf_to_megatron
from muon_ds.convert.layout import Parallelism
from muon_ds.convert.megatron_to_hf import megatron_to_hf
from muon_ds.convert.random_hf import write_random_hf_checkpoint
from muon_ds.glu_layout import shard_glu
from muon_ds.models.config import UnmappableConfigError

TINY = json.loads((Path(__file__).parent / "data" / "moonlight-tiny.config.json").read_text())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny") / "hf", dtype=torch.bfloat16)


def test_random_checkpoint_has_the_original_moonlight_layout(hf_dir: Path) -> None:
    index = json.loads((hf_dir / INDEX_NAME).read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in index
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in index
    assert "model.layers.0.mlp.up_proj.weight" in index  # first layer dense


@pytest.mark.parametrize(
    "par",
    [Parallelism(), Parallelism(tp=2, ep=2), Parallelism(tp=2, pp=3, ep=4), Parallelism(pp=2, last_stage_layers=2)],
)
def test_round_trip_is_bit_identical(hf_dir: Path, tmp_path: Path, par: Parallelism) -> None:
    hf_to_megatron(hf_dir, tmp_path / "mg", par, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=20_000, progress=False)
    original, back = _tensors(hf_dir), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == TINY


def test_rank_files_hold_megatron_tp_pieces(hf_dir: Path, tmp_path: Path) -> None:
    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(tp=2, ep=2), progress=False)
    hf = _tensors(hf_dir)
    rank = torch.load(tmp_path / "mg" / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    model = rank["model"]
    fc1 = model["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]  # global expert 2, TP rank 1
    gate, up = hf["model.layers.1.mlp.experts.2.gate_proj.weight"], hf["model.layers.1.mlp.experts.2.up_proj.weight"]
    assert torch.equal(fc1, shard_glu(gate, up, tp_size=2, tp_rank=1))
    kv_down = model["decoder.layers.0.self_attention.linear_kv_down_proj.weight"]
    assert torch.equal(kv_down, hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])  # TP-replicated


def test_refuses_to_overwrite(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "mg").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(), progress=False)
    assert main(["convert", "hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "mg"), "--quiet"]) == 2


def test_cli_round_trip(hf_dir: Path, tmp_path: Path) -> None:
    assert main(["convert", "hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "mg"), "--tp", "2",
                 "--quiet"]) == 0
    assert main(["convert", "megatron-to-hf", "--megatron", str(tmp_path / "mg"), "--out", str(tmp_path / "back"),
                 "--quiet"]) == 0
    assert _tensors(tmp_path / "back").keys() == _tensors(hf_dir).keys()


def _copy(hf_dir: Path, target: Path) -> Path:
    target.mkdir()
    for path in hf_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_missing_shard_is_named(hf_dir: Path, tmp_path: Path) -> None:
    broken = _copy(hf_dir, tmp_path / "hf")
    victim = sorted(broken.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        hf_to_megatron(broken, tmp_path / "mg", Parallelism(), progress=False)
    assert not (tmp_path / "mg").exists() and not (tmp_path / "mg.partial").exists()


def test_shape_mismatch_is_named(hf_dir: Path, tmp_path: Path) -> None:
    broken = _copy(hf_dir, tmp_path / "hf")
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    shard = broken / json.loads((broken / INDEX_NAME).read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=f"shape mismatch for '{key}'"):
        hf_to_megatron(broken, tmp_path / "mg", Parallelism(), progress=False)


def test_unmappable_config_in_checkpoint_is_named(hf_dir: Path, tmp_path: Path) -> None:
    broken = _copy(hf_dir, tmp_path / "hf")
    (broken / "config.json").write_text(json.dumps(TINY | {"scoring_func": "softmax"}))
    with pytest.raises(UnmappableConfigError, match="'scoring_func'"):
        hf_to_megatron(broken, tmp_path / "mg", Parallelism(), progress=False)


def test_parallel_size_that_does_not_divide_is_named(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_routed_experts=4 is not divisible"):
        hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(ep=3), progress=False)
    with pytest.raises(ValueError, match="num_hidden_layers=3 cannot be split over pp=2"):
        hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(pp=2), progress=False)


def test_missing_rank_file_is_named(hf_dir: Path, tmp_path: Path) -> None:
    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(tp=2), progress=False)
    victim = tmp_path / "mg" / "release" / "mp_rank_01" / "model_optim_rng.pt"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="mp_rank_01"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.partial").exists()
