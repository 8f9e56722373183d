"""The converter on the inputs users actually have: transformers-written configs, MTP fields, broken files,
a full disk and two conversions racing for one output. Every bad input is one line naming the file or field."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from muon_ds.cli import main
from muon_ds.convert import hf_to_megatron as hf_to_megatron_module
from muon_ds.convert.hf_files import INDEX_NAME
from muon_ds.convert.hf_to_megatron import hf_to_megatron
from muon_ds.convert.layout import Parallelism
from muon_ds.convert.random_hf import write_random_hf_checkpoint

TINY = json.loads((Path(__file__).parent / "data" / "moonlight-tiny.config.json").read_text())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_hf_checkpoint(TINY, tmp_path_factory.mktemp("tiny") / "hf")


def _copy(hf_dir: Path, target: Path) -> Path:
    target.mkdir()
    for path in hf_dir.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _cli_error(capsys: pytest.CaptureFixture, source: Path, out: Path) -> str:
    """Run hf-to-megatron through the CLI; it must fail with exactly one line on stderr and no output left."""
    assert main(["convert", "hf-to-megatron", "--hf", str(source), "--out", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("muon-ds: error: "), lines
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.muon-ds-*")), "output or staging left"
    return lines[0]


def _transformers_config(**changes: object) -> dict:
    """config.json as transformers 5 writes it (derived head_dim / qk_head_dim, num_nextn_predict_layers 1)."""
    from transformers import DeepseekV3Config

    fields = {k: v for k, v in TINY.items() if k != "num_nextn_predict_layers"}
    return json.loads(DeepseekV3Config(**fields).to_json_string()) | changes


def test_transformers_written_config_converts(hf_dir: Path, tmp_path: Path) -> None:
    written = _transformers_config()
    assert (written["head_dim"], written["qk_head_dim"], written["num_nextn_predict_layers"]) == (8, 24, 1)
    source = _copy(hf_dir, tmp_path / "hf")
    (source / "config.json").write_text(json.dumps(written))
    hf_to_megatron(source, tmp_path / "mg", Parallelism(tp=2), progress=False)
    assert (tmp_path / "mg" / "release" / "mp_rank_01" / "model_optim_rng.pt").is_file()


@pytest.mark.parametrize("field, value", [("qk_head_dim", 16), ("head_dim", 16)])
def test_inconsistent_derived_field_is_named(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             field: str, value: int) -> None:
    source = _copy(hf_dir, tmp_path / "hf")
    (source / "config.json").write_text(json.dumps(_transformers_config(**{field: value})))
    assert f"'{field}'={value}" in _cli_error(capsys, source, tmp_path / "mg")


def test_mtp_is_refused_only_when_the_checkpoint_has_mtp_weights(hf_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    source = _copy(hf_dir, tmp_path / "hf")
    (source / "config.json").write_text(json.dumps(TINY | {"num_nextn_predict_layers": 1}))
    index = json.loads((source / INDEX_NAME).read_text())
    shard = next(iter(index["weight_map"].values()))
    tensors = load_file(source / shard) | {"model.layers.3.eh_proj.weight": torch.zeros(64, 128)}
    save_file(tensors, source / shard)
    index["weight_map"]["model.layers.3.eh_proj.weight"] = shard
    (source / INDEX_NAME).write_text(json.dumps(index))
    assert "multi-token prediction" in _cli_error(capsys, source, tmp_path / "mg")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_broken_shard_is_named(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str) -> None:
    source = _copy(hf_dir, tmp_path / "hf")
    victim = sorted(source.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert victim.name in _cli_error(capsys, source, tmp_path / "mg")


def test_wrong_index_entry_is_named(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _copy(hf_dir, tmp_path / "hf")
    index = json.loads((source / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][key] = shards[1]
    (source / INDEX_NAME).write_text(json.dumps(index))
    error = _cli_error(capsys, source, tmp_path / "mg")
    assert key in error and shards[1] in error and INDEX_NAME in error


@pytest.mark.parametrize("name", ["config.json", INDEX_NAME])
def test_malformed_json_is_named(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    source = _copy(hf_dir, tmp_path / "hf")
    (source / name).write_text((source / name).read_text()[:-10])
    assert f"{source / name}: not valid JSON" in _cli_error(capsys, source, tmp_path / "mg")


@pytest.mark.parametrize("field, value", [("hidden_size", None), ("num_attention_heads", "4"),
                                          ("n_routed_experts", 4.5), ("rms_norm_eps", "1e-5"),
                                          ("n_shared_experts", "2"), ("first_k_dense_replace", None)])
def test_null_or_string_config_field_is_named(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              field: str, value: object) -> None:
    source = _copy(hf_dir, tmp_path / "hf")
    (source / "config.json").write_text(json.dumps(TINY | {field: value}))
    assert f"'{field}'={value!r}" in _cli_error(capsys, source, tmp_path / "mg")


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the OS fails it."""

    def writable(self) -> bool:
        return True

    def write(self, _data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_reported_with_the_file(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    monkeypatch.setattr(hf_to_megatron_module.torch, "save", lambda obj, _path: real_save(obj, _FullDisk()))
    error = _cli_error(capsys, hf_dir, tmp_path / "mg")
    assert "could not write" in error and "model_optim_rng.pt" in error and "No space left" in error


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root, else skipped): torch.save's own error there is an "enforce fail"."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a failed write may still hold a handle


def test_full_file_system_is_reported_with_the_file(hf_dir: Path, small_file_system: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    error = _cli_error(capsys, hf_dir, small_file_system / "mg")
    assert "could not write" in error and "the disk is full" in error and "enforce fail" not in error


def test_own_partial_directory_is_left_alone(hf_dir: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mg.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    hf_to_megatron(hf_dir, tmp_path / "mg", Parallelism(), progress=False)
    assert (mine / "notes.txt").read_text() == "mine"


def test_concurrent_conversions_to_one_output(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second conversion to the same --out finishes while the first is writing: the second's output is
    complete, the first fails instead of reporting success, and deletes nothing of the other's."""
    out = tmp_path / "mg"
    real_save = torch.save
    state = {"raced": False}

    def save_while_another_runs(obj: object, path: Path) -> None:
        if not state["raced"]:
            state["raced"] = True
            monkeypatch.setattr(hf_to_megatron_module.torch, "save", real_save)
            hf_to_megatron(hf_dir, out, Parallelism(), progress=False)  # the other run, to completion
        real_save(obj, path)

    monkeypatch.setattr(hf_to_megatron_module.torch, "save", save_while_another_runs)
    with pytest.raises(FileExistsError, match="appeared while converting"):
        hf_to_megatron(hf_dir, out, Parallelism(tp=2), progress=False)
    assert (out / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()  # the other's TP=1 output
    assert not (out / "release" / "mp_rank_01").exists() and not list(tmp_path.glob(".mg.muon-ds-*"))
