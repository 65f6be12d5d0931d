"""Checkpoints: exact round trip, JSON sidecar, architecture checks, corrupted or missing files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paper_repro import checkpoint as ckpt
from paper_repro.checkpoint import CheckpointError
from paper_repro.models import build


pytestmark = pytest.mark.usefixtures("single_thread")


def trained_like(name: str = "en2resnet20", **kwargs) -> torch.nn.Module:
    """A model whose BN buffers and weights differ from a fresh build (so a round trip is meaningful)."""
    model = build(name, **kwargs)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 16, 16))
        for p in model.parameters():
            p.mul_(1.01)
    return model.eval()


def test_round_trip_is_exact(tmp_path: Path):
    model = trained_like(seed=1)
    path = ckpt.save_model(tmp_path / "run" / "model.safetensors", model, epoch=3, quantizer="none")
    loaded = ckpt.load_model(path)
    assert not loaded.training
    assert loaded.arch == model.arch and loaded.arch_config == model.arch_config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    model.set_noise(False)
    loaded.set_noise(False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_plain_tensors_round_trip_and_sidecar_is_json(tmp_path: Path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3).t(),  # non-contiguous
               "b": torch.tensor([1, 2, 3], dtype=torch.int64), "c": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "t.safetensors"
    ckpt.save(path, tensors, {"note": "hello", "values": [1, 2]})
    side = json.loads((tmp_path / "t.json").read_text())
    assert side["note"] == "hello" and side["values"] == [1, 2]
    assert side["format"] == ckpt.FORMAT and "torch" in side["versions"]
    assert len(side["weights_sha256"]) == 64
    loaded, record = ckpt.load(path)
    assert record == side
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_sidecar_records_arch_config_and_extra_fields(tmp_path: Path):
    model = build("en1resnet20", noise=False, seed=2)
    path = ckpt.save_model(tmp_path / "m.safetensors", model, data_md5="abc")
    side = ckpt.read_sidecar(path)
    assert side["arch"] == "en1resnet20"
    assert side["arch_config"] == model.arch_config
    assert side["data_md5"] == "abc"


def test_wrong_architecture_names_both(tmp_path: Path):
    path = ckpt.save_model(tmp_path / "m.safetensors", build("en2resnet20"))
    with pytest.raises(CheckpointError, match=r"en2resnet20.*resnet56|resnet56.*en2resnet20"):
        ckpt.load_into(build("resnet56"), path)
    with pytest.raises(CheckpointError, match=r"en2resnet20.*en1resnet20"):
        ckpt.load_model(path, arch="en1resnet20")


def test_sidecar_that_lies_about_the_architecture_is_caught(tmp_path: Path):
    path = ckpt.save(tmp_path / "m.safetensors", build("resnet56").state_dict(),
                     {"arch": "resnet20", "arch_config": build("resnet20").arch_config})
    with pytest.raises(CheckpointError, match="resnet20"):
        ckpt.load_model(path)


def test_wrong_number_of_classes_is_a_mismatch(tmp_path: Path):
    path = ckpt.save_model(tmp_path / "m.safetensors", build("resnet20", num_classes=100))
    with pytest.raises(CheckpointError, match="mismatch"):
        ckpt.load_into(build("resnet20"), path)


def test_missing_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="sidecar missing"):
        ckpt.load(tmp_path / "nothing.safetensors")
    path = ckpt.save_model(tmp_path / "m.safetensors", build("resnet20"))
    path.unlink()
    with pytest.raises(CheckpointError, match="weights missing"):
        ckpt.load(path)


def test_corrupted_weights_are_detected(tmp_path: Path):
    path = ckpt.save_model(tmp_path / "m.safetensors", build("resnet20"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        ckpt.load_model(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        ckpt.load(path)


def test_corrupted_sidecar_is_detected(tmp_path: Path):
    path = ckpt.save_model(tmp_path / "m.safetensors", build("resnet20"))
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.load(path)
    (tmp_path / "m.json").write_text(json.dumps({"arch": "resnet20"}))
    with pytest.raises(CheckpointError, match="sidecar"):
        ckpt.load(path)


def test_garbage_weights_with_matching_hash_are_rejected(tmp_path: Path):
    path = ckpt.save_model(tmp_path / "m.safetensors", build("resnet20"))
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}   ")
    side = json.loads((tmp_path / "m.json").read_text())
    import hashlib
    side["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "m.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="safetensors"):
        ckpt.load(path)


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    ckpt.save(path, {"w": torch.zeros(3)}, {"v": 1})
    ckpt.save(path, {"w": torch.ones(3)}, {"v": 2})
    tensors, side = ckpt.load(path)
    assert torch.equal(tensors["w"], torch.ones(3)) and side["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_no_pickle_in_the_module():
    source = Path(ckpt.__file__).read_text()
    for forbidden in ("torch.load(", "import pickle", "pickle.load", "weights_only=False"):
        assert forbidden not in source


class Killed(Exception):
    """Stands in for a hard kill at a step of checkpoint.save."""


def save_killed_at(path: Path, tensors, sidecar, at: str) -> None:
    def step(name: str) -> None:
        if name == at:
            raise Killed(name)
    with pytest.raises(Killed):
        ckpt.save(path, tensors, sidecar, on_step=step)


@pytest.mark.parametrize("at, survives", [("weights-tmp", "old"), ("staged", "old"), ("committed", "new"),
                                          ("weights", "new")])
def test_interrupted_save_is_recovered_as_one_unit(tmp_path: Path, at, survives):
    """Issue 17.2: a crash at any step of a save leaves either the old or the new pair once recovered,
    never weights of one save with the sidecar of another; the reader names an interrupted save."""
    path = tmp_path / "state" / "last.safetensors"
    ckpt.save(path, {"w": torch.zeros(3)}, {"v": "old"})
    save_killed_at(path, {"w": torch.ones(3)}, {"v": "new"}, at)
    if at == "weights":  # new weights in place, old sidecar: the case that used to be unrecoverable
        with pytest.raises(CheckpointError, match="a save of it was interrupted"):
            ckpt.load(path)
    note = ckpt.recover(path)
    if at == "weights-tmp":  # an exception (not a kill) already removed the temp file: nothing staged
        assert note is None
    else:
        assert note and ("completed" if survives == "new" else "discarded") in note
    tensors, side = ckpt.load(path)
    assert side["v"] == survives and torch.equal(tensors["w"], torch.ones(3) if survives == "new" else torch.zeros(3))
    assert ckpt.recover(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.json", "last.safetensors"]


def test_first_save_interrupted_after_the_weights_is_explained(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_killed_at(path, {"w": torch.ones(2)}, {"v": 1}, "weights")
    with pytest.raises(CheckpointError, match="sidecar missing.*interrupted"):
        ckpt.load(path)
    ckpt.recover(path)
    assert ckpt.load(path)[1]["v"] == 1
