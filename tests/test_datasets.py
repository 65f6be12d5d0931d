"""CIFAR-100 and SVHN (issue 16): prepare reads each official format safely, the dataset flows into the
model's head, AutoAttack, metrics and deviations, and every reported number maps to a paper-profile run."""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from archive_factory import (make_archive, make_cifar100_archive, make_cifar100_files, make_svhn_folder, svhn_arrays,
                             write_archive)
from paper_repro import archives, attacks, cli, comparability, config, evaluate as E, recipe, train as train_mod
from paper_repro.claims import load_registry
from paper_repro.data import DataError, load_prepared, prepare
from paper_repro.metrics_schema import validate_metrics
from paper_repro.models import build

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- CIFAR-100
def test_cifar100_archive_prepares_with_fine_labels(tmp_path):
    meta = prepare(str(make_cifar100_archive(tmp_path / "c100.tar.gz", 2, 1)), tmp_path / "p", dataset="cifar100")
    got = load_prepared(tmp_path / "p")
    assert (got.dataset, got.num_classes, meta["num_classes"]) == ("cifar100", 100, 100)
    assert got.x_train.shape == (200, 3, 32, 32) and got.x_train.dtype == np.uint8
    assert sorted(np.unique(got.y_train)) == list(range(100)) and got.y_test.max() == 99
    assert meta["classes"][:2] == ["fine_0", "fine_1"] and len(meta["class_counts"]["train"]) == 100
    assert meta["official"] is False and (tmp_path / "p" / "cifar100.safetensors").is_file()


def test_cifar100_official_flag_needs_every_pinned_md5(tmp_path, monkeypatch):
    files = make_cifar100_files()
    archive = write_archive(tmp_path / "c100.tar.gz", files, prefix="cifar-100-python/")
    lay = archives.CIFAR_LAYOUTS["cifar100"]
    pinned = {n: hashlib.md5(b).hexdigest() for n, b in files.items()}
    monkeypatch.setitem(archives.CIFAR_LAYOUTS, "cifar100", dataclasses.replace(lay, file_md5=pinned))
    assert prepare(str(archive), tmp_path / "p", dataset="cifar100")["official"] is True
    monkeypatch.setitem(archives.CIFAR_LAYOUTS, "cifar100", dataclasses.replace(lay, file_md5={**pinned, "meta": "0" * 32}))
    assert prepare(str(archive), tmp_path / "q", dataset="cifar100")["official"] is False
    assert lay.file_md5["train"] == "16019d7e3df5f24257cddd939b257f8d"  # torchvision's pin, unchanged


def _traversal() -> tarfile.TarInfo:
    info = tarfile.TarInfo("../evil")
    info.size = 1
    return info


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case, message", [
    ("traversal", "escaping the target folder"),
    ("missing_meta", "missing cifar-100-python/meta"),
    ("label_out_of_range", "labels must lie in 0..99"),
    ("forbidden_global", "forbidden global"),
    ("cifar10_archive", "not a CIFAR-100 python archive"),
    ("wrong_counts", "expected 50000 / 10000"),
])
def test_cifar100_rejects_bad_inputs(tmp_path, case, message):
    files = make_cifar100_files()
    extra = None
    if case == "traversal":
        extra = [_traversal()]
    elif case == "missing_meta":
        files.pop("meta")
    elif case == "label_out_of_range":
        batch = pickle.loads(files["train"])
        batch["fine_labels"][0] = 100
        files["train"] = pickle.dumps(batch, protocol=2)
    elif case == "forbidden_global":
        files["test"] = pickle.dumps({"data": Evil(), "fine_labels": []}, protocol=2)
    archive = (make_archive(tmp_path / "a.tar.gz") if case == "cifar10_archive" else
               write_archive(tmp_path / "a.tar.gz", files, prefix="cifar-100-python/", extra=extra))
    counts = [50000, 10000] if case == "wrong_counts" else None
    with pytest.raises(DataError, match=message):
        prepare(str(archive), tmp_path / "out", dataset="cifar100", expect_counts=counts)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- SVHN
def test_svhn_folder_prepares_with_digit_zero_as_label_zero(tmp_path):
    meta = prepare(str(make_svhn_folder(tmp_path / "svhn")), tmp_path / "p", dataset="svhn")
    got = load_prepared(tmp_path / "p")
    assert (got.dataset, got.num_classes) == ("svhn", 10)
    assert meta["counts"] == {"train": 30, "test": 20} and meta["classes"] == [str(d) for d in range(10)]
    assert np.bincount(got.y_train).tolist() == [3] * 10 and got.y_train.min() == 0
    assert got.x_train.shape == (30, 3, 32, 32) and got.x_train.dtype == np.uint8
    # pixel layout: the .mat holds X[row, col, channel, n]; we store [n, channel, row, col]
    import scipy.io
    X = scipy.io.loadmat(tmp_path / "svhn" / "train_32x32.mat")["X"]
    assert np.array_equal(got.x_train[7], np.transpose(X[..., 7], (2, 0, 1)))
    assert set(meta["files_md5"]) == {"train_32x32.mat", "test_32x32.mat"} and meta["official"] is False


def test_svhn_pins_torchvisions_md5s_and_flags_official(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN
    assert archives.SVHN_SPLITS["train"] == ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373")
    assert archives.SVHN_SPLITS["test"] == ("test_32x32.mat", SVHN.split_list["test"][2])
    folder = make_svhn_folder(tmp_path / "svhn")
    pinned = {s: (n, hashlib.md5((folder / n).read_bytes()).hexdigest()) for s, (n, _) in archives.SVHN_SPLITS.items()}
    monkeypatch.setattr(archives, "SVHN_SPLITS", pinned)
    assert prepare(str(folder), tmp_path / "p", dataset="svhn")["official"] is True


@pytest.mark.parametrize("case, message", [
    ("missing_test", "missing test_32x32.mat"),
    ("not_a_folder", "SVHN folder not found"),
    ("garbage", "unreadable SVHN .mat file"),
    ("wrong_shape", "X must be uint8 32x32x3xN"),
    ("label_zero", "labels must lie in 1..10"),
    ("wrong_keys", "expected 'X' and 'y'"),
    ("wrong_counts", "expected 73257 / 26032"),
])
def test_svhn_rejects_bad_inputs(tmp_path, case, message):
    folder = tmp_path / "svhn"
    labels = np.repeat(np.arange(10), 2)
    if case == "wrong_shape":
        bad = svhn_arrays(labels, 0)
        make_svhn_folder(folder, train={"X": bad["X"][:16], "y": bad["y"]})
    elif case == "label_zero":
        bad = svhn_arrays(labels, 0)
        bad["y"][0] = 0
        make_svhn_folder(folder, train=bad)
    elif case == "wrong_keys":
        make_svhn_folder(folder, train={"images": np.zeros((2, 2), np.uint8)})
    else:
        make_svhn_folder(folder)
    if case == "missing_test":
        (folder / "test_32x32.mat").unlink()
    if case == "garbage":
        (folder / "train_32x32.mat").write_bytes(b"not a MATLAB file at all" * 10)
    source = str(tmp_path / "nowhere") if case == "not_a_folder" else str(folder)
    counts = [73257, 26032] if case == "wrong_counts" else None
    with pytest.raises(DataError, match=message):
        prepare(source, tmp_path / "out", dataset="svhn", expect_counts=counts)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- several datasets, one profile
def test_experiments_on_other_datasets_get_subfolders_through_the_cli(tmp_path, monkeypatch):
    c10 = make_archive(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.delenv("CIFAR10_ARCHIVE", raising=False)  # `make test` exports the stand-in's; params name c10
    monkeypatch.setenv("CIFAR100_ARCHIVE", str(make_cifar100_archive(tmp_path / "c100.tar.gz")))
    monkeypatch.setenv("SVHN_DIR", str(make_svhn_folder(tmp_path / "svhn-files")))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "profile": "test", "data": {"archive": str(c10), "prepared": str(tmp_path / "prepared"), "expect_counts": None,
                                    "val_size": 5},
        "experiments": {"a": {"model": "resnet8"}, "b": {"model": "resnet8", "dataset": "cifar100"},
                        "c": {"model": "resnet8", "dataset": "svhn"}}}))
    assert cli.main(["prepare", "--params", str(params)]) == 0
    prepared = tmp_path / "prepared"
    assert load_prepared(prepared).dataset == "cifar10"
    assert load_prepared(prepared, "cifar10").dataset == "cifar10"
    assert load_prepared(prepared, "cifar100").num_classes == 100
    assert load_prepared(prepared, "svhn").dataset == "svhn"
    with pytest.raises(DataError, match="holds cifar10, not svhn"):
        load_prepared(_only_main(tmp_path, c10), "svhn")


def _only_main(tmp_path: Path, archive: Path) -> Path:
    prepare(str(archive), tmp_path / "main-only")
    return tmp_path / "main-only"


def test_dataset_settings_are_validated():
    assert config.from_dict({}).data.dataset == "cifar10"
    with pytest.raises(config.ConfigError, match="data.dataset must be one of"):
        config.from_dict({"data": {"dataset": "imagenet"}})
    with pytest.raises(config.ConfigError, match="CIFAR-10 archive's md5"):
        config.from_dict({"data": {"dataset": "svhn"}})
    assert config.from_dict({"data": {"dataset": "svhn", "md5": None}}).data.dataset == "svhn"
    with pytest.raises(config.ConfigError, match="dataset must be one of"):
        config.from_dict({"experiments": {"x": {"model": "resnet20", "dataset": "mnist"}}})
    for model in ("en5wrn34-10", "wrn28-10", "vgg11"):
        config.from_dict({"experiments": {"x": {"model": model}}})
    for model in ("wrn33-10", "vgg12", "en0wrn34-10", "envgg11"):
        with pytest.raises(config.ConfigError, match="unknown model"):
            config.from_dict({"experiments": {"x": {"model": model}}})


# --------------------------------------------------------------------------- end to end
TRAIN = {"epochs": 2, "batch_size": 50, "lr": 0.02, "milestones": [], "augment": False, "relax": {"hard_epoch": 1},
         "pgd": {"steps": 1, "step": 0.016}, "val_attack": {"steps": 1}}
EVAL = {"n_examples": 12, "batch_size": 12, "seeds": [0], "audit": False, "sanity": False,
        "attacks": {"natural": {"attack": "natural", "eps": 0.0, "paper_column": "A1"},
                    "fgsm": {"attack": "fgsm", "eps": 0.031, "paper_column": "A2"}}}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("dataset", ["cifar100", "svhn"])
def test_train_and_evaluate_end_to_end(tmp_path, dataset):
    c10 = make_archive(tmp_path / "cifar-10-python.tar.gz")
    source = (make_cifar100_archive(tmp_path / "c100.tar.gz") if dataset == "cifar100"
              else make_svhn_folder(tmp_path / "svhn"))
    prepare(str(c10), tmp_path / "prepared", extra=[(dataset, str(source))])
    settings = config.from_dict({
        "profile": "test", "train": TRAIN, "evaluate": EVAL,
        "data": {"prepared": str(tmp_path / "prepared"), "expect_counts": None, "val_size": 10},
        "experiments": {"r": {"model": "en1resnet8", "quantizer": "ternary", "loss": "pgd_at", "dataset": dataset}}})
    exp = settings.experiment("r")
    train_mod.train(settings, exp, tmp_path / "runs" / "r", quiet=True)
    m = E.evaluate_run(settings, exp, tmp_path / "runs" / "r", tmp_path / "metrics" / "r.json", quiet=True)
    validate_metrics(m)
    n_classes = recipe.NUM_CLASSES[dataset]
    assert m["data"]["dataset"] == dataset and m["data"]["num_classes"] == n_classes
    assert m["data"]["same_as_training"] is True
    model, _, sidecar = E.load_run(tmp_path / "runs" / "r", torch.device("cpu"))
    assert model.members[0].fc.out_features == n_classes and sidecar["arch_config"]["num_classes"] == n_classes
    label = recipe.DATASET_LABELS[dataset]
    devs = comparability.deviations(m)
    assert any(d.startswith(f"not the official {label} data") for d in devs), devs
    if dataset == "svhn":
        assert "12 SVHN test images vs 26,032" in devs


def test_autoattack_takes_the_number_of_classes_from_the_model():
    model = build("resnet8", num_classes=100)
    assert attacks.num_classes(model, torch.zeros(1, 3, 32, 32)) == 100
    wrapped = torch.nn.Sequential(model)  # wrappers (autocast, noise off) lose arch_config: the head decides
    assert attacks.num_classes(wrapped, torch.zeros(1, 3, 32, 32)) == 100
    assert attacks.num_classes(build("vgg11"), torch.zeros(1, 3, 32, 32)) == 10


def test_metrics_reject_an_unknown_dataset():
    from fixtures_metrics import make_metrics
    m = make_metrics("resnet20", "none", "none", "pgd_at")
    validate_metrics(m)
    m["data"]["dataset"] = "mnist"
    with pytest.raises(ValueError, match="data.dataset"):
        validate_metrics(m)


# --------------------------------------------------------------------------- claims -> paper-profile runs
def test_every_reported_number_maps_to_a_paper_profile_run_on_its_dataset():
    paper = config.load(ROOT / "params.yaml")
    experiments = {e.name: e for e in paper.experiments}
    reported = [c for c in load_registry().numeric if c.value is not None]
    assert reported
    unmapped = [c.id for c in reported if c.maps_to is None or c.maps_to.run not in experiments]
    assert not unmapped, f"reported numbers without a paper-profile run: {unmapped}"
    for c in reported:
        exp = experiments[c.maps_to.run]
        assert (exp.dataset or paper.data.dataset) == c.dataset, c.id
        sel = c.maps_to.select
        assert sel.get("model", exp.model) == exp.model, c.id
        assert sel.get("loss", exp.loss) == exp.loss, c.id
        assert str(sel.get("quantizer", exp.quantizer)).replace("fp", "none") == exp.quantizer, c.id
