"""Evaluation: the metrics schema, attack ordering on a model trained here, seeded repeats,
float and quantized runs, the CLI, summary.csv and settings validation."""
from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from archive_factory import make_archive
from fixtures_metrics import make_metrics, write_metrics
from paper_repro import checkpoint, cli, config, evaluate as E, recipe, scoring, stats, summary, train as train_mod
from paper_repro.data import prepare
from paper_repro.models import build
from paper_repro.quant import load_packed

# Learnable in seconds on the synthetic data (class = colour); robust accuracy stays non-trivial.
TRAIN = {"epochs": 8, "batch_size": 30, "lr": 0.02, "milestones": [], "relax": {"hard_epoch": 1}, "augment": False,
         "pgd": {"steps": 2, "step": 0.016}, "val_attack": {"steps": 3}}
EXPERIMENTS = {"q": {"model": "en1resnet8", "quantizer": "ternary", "method": "BR", "loss": "pgd_at"},
               "f": {"model": "en1resnet8", "loss": "pgd_at"}}
EVAL = {
    "n_examples": 20, "batch_size": 10, "seeds": [0, 1], "audit_examples": 8, "sanity_examples": 20,
    "sanity_steps": [5, 10, 20], "square_queries": 40,
    "attacks": {**{k: config.to_dict(v) for k, v in config.EvaluateSettings.paper_attacks().items()},
                "cw_ref": {"attack": "cw_ref", "paper_column": "A4", "options": {"steps": 10}}},
    "audit_attacks": {
        "pgd50_eot": {"attack": "pgd", "eot": 2, "options": {"steps": 50, "step": 1 / 255, "restarts": 2}},
        "cw_linf": {"attack": "cw_linf", "eot": 2, "options": {"steps": 10}},
        "autoattack_rand": {"attack": "autoattack", "noisy_only": True, "options": {"version": "rand", "steps": 2}},
    },
}
VOLATILE = ("timing", "seconds")  # wall-clock entries: everything else must repeat exactly


pytestmark = pytest.mark.usefixtures("single_thread")


def settings_dict(root: Path, **evaluate) -> dict:
    return {"profile": "test", "data": {"prepared": str(root / "prepared"), "expect_counts": None, "val_size": 30},
            "train": TRAIN, "evaluate": {**EVAL, **evaluate}, "experiments": EXPERIMENTS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Prepared data, a trained ternary run 'q' and its float twin 'f', and q evaluated once."""
    root = tmp_path_factory.mktemp("evaluate")
    prepare(str(make_archive(root / "cifar-10-python.tar.gz")), root / "prepared")
    settings = config.from_dict(settings_dict(root))
    for name in ("q", "f"):
        train_mod.train(settings, settings.experiment(name), root / "runs" / name, quiet=True)
    metrics = E.evaluate_run(settings, settings.experiment("q"), root / "runs" / "q", root / "metrics" / "q.json",
                             quiet=True)
    return {"root": root, "settings": settings, "metrics": metrics}


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- end to end
def test_metrics_file_follows_the_schema(tiny):
    root, m = tiny["root"], tiny["metrics"]
    on_disk = json.loads((root / "metrics" / "q.json").read_text())
    E.validate_metrics(on_disk)
    assert strip(on_disk) == strip(m)
    identity = (m["run"], m["model"], m["quantizer"], m["method"], m["loss"])
    assert identity == ("q", "en1resnet8", "ternary", "BR", "pgd_at")
    assert m["noise"] is True and m["n_examples"] == 20 and m["seeds"] == [0, 1] and m["profile"] == "test"
    assert {k: m["accuracy"][k]["paper_column"] for k in recipe.PAPER_ATTACKS} == dict(zip(recipe.PAPER_ATTACKS, tuple(recipe.PAPER_COLUMNS.values())))
    assert "reference variant" in m["accuracy"]["cw_ref"]["label"]
    audit = {"pgd50_eot@0.031", "pgd50_eot@8/255", "cw_linf@0.031", "cw_linf@8/255", "autoattack_rand@0.031",
             "autoattack_rand@8/255"}
    assert audit <= set(m["accuracy"])
    assert all(m["accuracy"][k]["n"] == 8 and m["accuracy"][k]["audit"] for k in audit)
    assert m["accuracy"]["pgd50_eot@8/255"]["eps"] == pytest.approx(8 / 255)
    assert m["accuracy"]["pgd50_eot@0.031"]["eot"] == 2 and m["accuracy"]["fgsm"]["eot"] == 1
    for entry in m["accuracy"].values():
        assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1] and entry["ci_method"] == "t over seeds"
        assert entry["seconds"] >= 0 and math.isclose(sum(entry["per_seed"]) / 2, entry["mean"], abs_tol=0.01)
    assert set(m["timing"]["attacks_s"]) == set(m["accuracy"]) and m["timing"]["total_s"] > 0
    # sparsity and size of the deployed ternary weights
    assert 0 < m["sparsity"]["weight"] < 100 and len(m["sparsity"]["layers"]) == 7
    assert m["size"]["compression"] > 1 and m["size"]["bits_per_quantized_weight"] == 2
    assert m["data"]["official"] is False and m["data"]["same_as_training"] is True and m["data"]["n_test"] == 20
    assert m["provenance"]["epochs"] == TRAIN["epochs"] and m["provenance"]["train_seed"] == 0
    assert m["provenance"]["wall_s"] > 0 and "torch" in m["provenance"]["versions"]


def test_examples_file_holds_per_seed_correctness(tiny):
    m = tiny["metrics"]
    with np.load(tiny["root"] / "metrics" / "q.examples.npz", allow_pickle=False) as z:
        assert z["y"].shape == (20,) and z["index"].tolist() == list(range(20))
        for key, entry in m["accuracy"].items():
            arr = z[m["examples"]["arrays"][key]]
            assert arr.dtype == bool and arr.shape == (len(entry["seeds"]), entry["n"])
            assert arr.sum(axis=1).tolist() == entry["correct"]
    # the pair (issue 17, item 9): the metrics name the md5 of the examples file they describe
    import hashlib
    blob = (tiny["root"] / "metrics" / "q.examples.npz").read_bytes()
    assert m["examples"]["md5"] == hashlib.md5(blob).hexdigest()


def test_metrics_and_examples_are_written_as_a_pair(tmp_path, monkeypatch):
    """A failure while writing the metrics leaves no metrics that describe other examples."""
    from paper_repro import atomic, evaluate
    metrics_file, examples_file = tmp_path / "r.json", tmp_path / "r.examples.npz"
    metrics_file.write_text('{"old": true}')
    examples_file.write_bytes(b"old examples")
    with pytest.raises(ValueError):  # not serialisable: nothing is written
        evaluate.write_pair(examples_file, b"new", metrics_file, {"bad": float("nan")})
    assert metrics_file.read_text() == '{"old": true}' and examples_file.read_bytes() == b"old examples"
    real = atomic.write_text

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(atomic, "write_text", disk_full)
    with pytest.raises(OSError):
        evaluate.write_pair(examples_file, b"new", metrics_file, {"n": 1})
    assert not metrics_file.exists() and examples_file.read_bytes() == b"new"
    monkeypatch.setattr(atomic, "write_text", real)
    evaluate.write_pair(examples_file, b"new", metrics_file, {"n": 1})
    assert json.loads(metrics_file.read_text()) == {"n": 1}


def test_attack_ordering_natural_fgsm_pgd(tiny):
    """On the same images (the audit subset is the first audit_examples test images) and seeds."""
    m = tiny["metrics"]
    n = m["audit"]["n_examples"]
    with np.load(tiny["root"] / "metrics" / "q.examples.npz") as z:
        acc = {k: 100 * z[m["examples"]["arrays"][k]][:, :n].mean() for k in ("natural", "fgsm", "pgd50_eot@0.031")}
    assert acc["natural"] >= acc["fgsm"] >= acc["pgd50_eot@0.031"], acc
    assert acc["natural"] > acc["pgd50_eot@0.031"]  # the attacks do something on this model
    assert m["accuracy"]["natural"]["mean"] >= 50  # and the model learned something


def test_sanity_flags_stay_clear_on_the_trained_model(tiny):
    sanity = tiny["metrics"]["sanity"]
    expected = {"more_steps_not_weaker", "eps_sweep_to_zero", "blackbox_not_stronger", "transfer_not_stronger",
                "iterative_not_weaker", "deployed_weights_quantized"}
    assert set(sanity) == expected
    assert all(flag["passed"] is True for flag in sanity.values()), {k: v["detail"] for k, v in sanity.items()}
    assert sanity["transfer_not_stronger"]["values"]["source"] == "f"
    assert sanity["eps_sweep_to_zero"]["values"]["accuracy"][-1] <= 2.0


def test_seeded_rerun_repeats_exactly(tiny):
    root, settings = tiny["root"], tiny["settings"]
    again = E.evaluate_run(settings, settings.experiment("q"), root / "runs" / "q", root / "again" / "q.json",
                           quiet=True)
    first, second = strip(tiny["metrics"]), strip(again)
    first["examples"].pop("file"), second["examples"].pop("file")
    assert first == second
    with np.load(root / "metrics" / "q.examples.npz") as a, np.load(root / "again" / "q.examples.npz") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and all(np.array_equal(a[k], b[k]) for k in a.keys())


def test_float_run_via_cli_then_summary(tiny, tmp_path, capsys):
    root = tiny["root"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(settings_dict(root, audit=False, seeds=[3])))
    out = tmp_path / "metrics" / "f.json"
    code = cli.main(["evaluate", "--params", str(params), "-e", "f", "--run-dir", str(root / "runs" / "f"),
                     "--out", str(out), "--quiet"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    m = json.loads(out.read_text())
    E.validate_metrics(m)
    assert m["quantizer"] == "none" and m["method"] == "none" and m["seeds"] == [3]
    assert m["sparsity"]["weight"] == 0.0 and m["size"]["compression"] == 1.0 and m["size"]["packed_bytes"] > 0
    assert m["sparsity"]["selection"].startswith("reference rule") and len(m["sparsity"]["layers"]) == 7
    assert m["sanity"]["transfer_not_stronger"]["passed"] is None  # float run: nothing to transfer from
    assert m["sanity"]["deployed_weights_quantized"]["passed"] is None
    assert m["accuracy"]["natural"]["std"] is None and m["accuracy"]["natural"]["ci_method"].startswith("wilson")
    assert not any(k.startswith("pgd50") for k in m["accuracy"])
    (tmp_path / "metrics" / "q.json").write_text(json.dumps(tiny["metrics"]))
    # the verify stage writes the cross-run summary beside the verdicts
    assert cli.main(["verify", "--metrics", str(tmp_path / "metrics"), "--out", str(tmp_path / "reports"),
                     "--no-table"]) == 0
    rows = list(csv.DictReader((tmp_path / "reports" / "summary.csv").open()))
    assert [r["run"] for r in rows] == ["f", "q"]
    assert rows[1]["pgd50_eot@0.031_mean"] and rows[0]["pgd50_eot@0.031_mean"] == ""
    assert rows[0]["sparsity_weight"] == "0.0" and rows[1]["official"] == "False"
    assert set(json.loads((tmp_path / "reports" / "metrics.json").read_text())) == {"f", "q"}


def test_metrics_record_what_ran_for_comparability(tiny, tmp_path):
    """Whether bf16 autocast ran (training and evaluation) and how each paper column ran are recorded, and the
    deviations come from them: here amp auto on a CPU (fp32) and a cw_ref that is not the paper's (10 steps, the
    function's default variant "spec" instead of the reference's "aliased")."""
    from paper_repro import comparability

    m = tiny["metrics"]
    assert m["amp_in_effect"] is False and m["training"]["amp_in_effect"] is False
    devs = comparability.deviations(m)
    assert not [d for d in devs if "autocast" in d or "precision" in d], devs
    assert "cw_ref (A4) option steps 10 vs unset (the function's default)" in devs
    assert "cw_ref (A4) option variant unset (the function's default) vs 'aliased'" in devs
    assert not [d for d in devs if d.startswith(("natural (A1)", "fgsm (A2)", "ifgsm20 (A3)"))], devs
    root = tiny["root"]
    settings = config.from_dict(settings_dict(root, audit=False, sanity=False, n_examples=4, seeds=[0], amp="bf16"))
    m = E.evaluate_run(settings, settings.experiment("q"), root / "runs" / "q", tmp_path / "q.json", quiet=True)
    assert m["amp_in_effect"] is True and m["settings"]["amp"] == "bf16"
    assert "bf16 autocast evaluation vs fp32" in comparability.deviations(m)


def test_export_packed_writes_a_loadable_model(tiny, tmp_path):
    root = tiny["root"]
    settings = config.from_dict(settings_dict(root, audit=False, sanity=False, n_examples=4, seeds=[0],
                                              export_packed=True))
    m = E.evaluate_run(settings, settings.experiment("q"), root / "runs" / "q", tmp_path / "m" / "q.json", quiet=True)
    packed = Path(m["packed"])
    assert packed == tmp_path / "m" / "packed" / "q.safetensors"
    tensors, header = load_packed(packed)
    deployed, _ = checkpoint.load(root / "runs" / "q" / "deployed.safetensors")
    assert all(torch.equal(tensors[k], deployed[k]) for k in deployed if k in tensors)
    assert m["sanity"]["eps_sweep_to_zero"]["passed"] is None and m["sanity"]["eps_sweep_to_zero"]["skipped"]


@pytest.mark.slow
def test_autoattack_standard_with_noise_off(tiny, tmp_path):
    root = tiny["root"]
    audit = {"autoattack_standard_noise_off": {"attack": "autoattack", "noise": False,
                                               "options": {"version": "standard", "steps": 2}}}
    settings = config.from_dict(settings_dict(root, sanity=False, n_examples=4, audit_examples=3, seeds=[0],
                                              audit_eps=[8 / 255], audit_attacks=audit))
    m = E.evaluate_run(settings, settings.experiment("q"), root / "runs" / "q", tmp_path / "q.json", quiet=True)
    entry = m["accuracy"]["autoattack_standard_noise_off@8/255"]
    assert entry["noise"] is False and entry["n"] == 3 and entry["mean"] <= m["accuracy"]["natural"]["mean"] + 34


def test_missing_run_fails_cleanly(tiny, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(settings_dict(tiny["root"])))
    code = cli.main(["evaluate", "--params", str(params), "-e", "q", "--run-dir", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint sidecar missing" in err and "train" in err
    assert not (tmp_path / "q.json").exists()


# --------------------------------------------------------------------------- schema validator
def test_validate_metrics_accepts_contract_documents():
    for spec in (("en1resnet20", "ternary", "BR", "pgd_at"), ("resnet20", "none", "none", "pgd_at"),
                 ("en1resnet20", "4bit", "BR", "tradeoff")):
        E.validate_metrics(make_metrics(*spec))


BREAKS = [
    (lambda m: m.pop("accuracy"), "accuracy is missing"),
    (lambda m: m["accuracy"]["fgsm"].pop("mean"), "accuracy.fgsm.mean is missing"),
    (lambda m: m["accuracy"]["fgsm"].update(mean=120.0), "accuracy.fgsm.mean must be a percentage"),
    (lambda m: m["accuracy"]["natural"].update(correct=[1, 2]), "accuracy.natural.correct must list one count"),
    (lambda m: m["accuracy"]["natural"]["per_seed"].__setitem__(0, 1.0), "accuracy.natural.per_seed"),
    (lambda m: m["accuracy"]["cw_ref"].update(paper_column="A9"), "accuracy.cw_ref.paper_column"),
    (lambda m: m["accuracy"]["fgsm"].update(ci95=[3.0]), "accuracy.fgsm.ci95"),
    (lambda m: m["sanity"]["deployed_weights_quantized"].update(passed="yes"),
     "sanity.deployed_weights_quantized.passed"),
    (lambda m: m.update(quantizer="3bit"), "quantizer must be one of"),
    (lambda m: m.update(schema_version=2), "schema_version must be 1"),
    (lambda m: m["data"].pop("official"), "data.official is missing"),
    (lambda m: m["sparsity"].update(channel=-1), "sparsity.channel"),
    (lambda m: m["size"].pop("compression"), "size.compression"),
    (lambda m: m["provenance"].pop("epochs"), "provenance.epochs is missing"),
    (lambda m: m.update(noise="yes"), "noise must be bool"),
    (lambda m: m.update(amp_in_effect="auto"), "amp_in_effect must be true or false"),
    (lambda m: m["training"].update(amp_in_effect="bf16"), "training.amp_in_effect must be true, false or null"),
]


@pytest.mark.parametrize("breaker, message", BREAKS, ids=[b[1] for b in BREAKS])
def test_validate_metrics_names_the_broken_key(breaker, message):
    doc = copy.deepcopy(make_metrics("en1resnet20", "ternary", "BR", "pgd_at"))
    breaker(doc)
    with pytest.raises(ValueError, match=f"^metrics: {message.replace('[', '.').replace('(', '.')}"):
        E.validate_metrics(doc)


def test_summary_csv_one_row_per_metrics_file(tmp_path):
    docs = write_metrics(tmp_path, [make_metrics("resnet20", "none", "none", "pgd_at"),
                                    make_metrics("en1resnet20", "ternary", "BR", "pgd_at"),
                                    make_metrics("en1resnet20", "4bit", "BR", "tradeoff")])
    (tmp_path / "not_metrics.json").write_text("{\"other\": 1}")  # metrics/ holds runs' metrics only
    with pytest.raises(ValueError, match="not_metrics.json: metrics: schema_version must be 1"):
        summary.summarize(tmp_path)
    (tmp_path / "not_metrics.json").unlink()
    out = summary.summarize(tmp_path)
    with out.open() as fh:
        reader = csv.DictReader(fh)
        rows, columns = list(reader), reader.fieldnames
    assert len(rows) == len(docs) and sorted(r["run"] for r in rows) == sorted(d["run"] for d in docs)
    documented = ["run", "model", "quantizer", "method", "loss", "profile", "official"]
    assert columns[:7] == documented
    assert columns[7:15] == [f"{a}_{s}" for a in recipe.PAPER_ATTACKS for s in ("mean", "std")]
    assert {"sparsity_weight", "sparsity_channel", "size_compression", "sanity_failed"} <= set(columns)
    broken = make_metrics("resnet20", "none", "none", "natural")
    broken["accuracy"]["fgsm"]["mean"] = "high"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="broken.json: metrics: accuracy.fgsm.mean"):
        summary.summarize(tmp_path)


# --------------------------------------------------------------------------- settings and helpers
@pytest.mark.parametrize("override, message", [
    ("evaluate.seeds=[]", "evaluate.seeds must list at least one seed"),
    ("evaluate.n_examples=0", "evaluate.n_examples must be >= 1"),
    ("evaluate.attacks={x: {attack: deepfool}}", "evaluate.attacks.x.attack must be one of"),
    ("evaluate.attacks={x: {attack: pgd, options: {eps: 0.1}}}", "evaluate.attacks.x.options.eps is set by"),
    ("evaluate.audit_attacks={fgsm: {attack: fgsm}}", "evaluate.audit_attacks.fgsm is also in evaluate.attacks"),
    ("evaluate.sanity_eps=[0.3, 0.1]", "evaluate.sanity_eps must be"),
    ("evaluate.sanity_steps=[10]", "evaluate.sanity_steps must be"),
    ("evaluate.audit_eps=[2]", "evaluate.audit_eps must list"),
    ("evaluate.amp=fp8", "evaluate.amp must be one of"),
    ("evaluate.batchsize=3", "unknown key evaluate.batchsize"),
])
def test_bad_settings_fail_at_load_naming_the_key(tmp_path, override, message):
    params = tmp_path / "params.yaml"
    params.write_text("profile: test\n")
    with pytest.raises(config.ConfigError, match=message.replace("[", ".").replace("(", ".")):
        config.load(params, [override])


def test_unknown_attack_option_fails_before_any_work():
    ev = config.from_dict({"evaluate": {"attacks": {"p": {"attack": "pgd", "options": {"stepz": 3}}}}}).evaluate
    with pytest.raises(config.ConfigError, match=r"evaluate.attacks.p.options.stepz is not a parameter of attacks.pgd"):
        scoring.check_settings(ev)
    ev = config.from_dict({"evaluate": {"attacks": {"a": {"attack": "autoattack", "eot": 3}}}}).evaluate
    with pytest.raises(config.ConfigError, match="evaluate.attacks.a.eot"):
        scoring.check_settings(ev)
    scoring.check_settings(config.EvaluateSettings())  # the paper profile is valid


def test_defaults_are_the_paper_profile():
    ev = config.EvaluateSettings()
    assert ev.n_examples == 10000 and ev.seeds == [0, 1, 2, 3, 4] and ev.audit and ev.sanity
    assert list(ev.attacks) == list(recipe.PAPER_ATTACKS)
    eps = {k: v.eps for k, v in ev.attacks.items()}
    assert eps == {"natural": 0.0, "fgsm": 0.031, "ifgsm20": 0.031, "cw_ref": 0.031}
    jobs, skipped = scoring.plan(ev, 10000, noisy=True)
    keys = [j.key for j in jobs]
    assert keys[:4] == list(recipe.PAPER_ATTACKS) and not skipped
    assert {"pgd50_eot@0.031", "pgd50_eot@8/255", "cw_linf@0.031", "autoattack_rand@0.031",
            "autoattack_standard_noise_off@8/255"} <= set(keys)
    _, skipped = scoring.plan(ev, 10000, noisy=False)
    assert set(skipped) == {"autoattack_rand@0.031", "autoattack_rand@8/255"}


def test_eps_label():
    assert scoring.eps_label(8 / 255) == "8/255" and scoring.eps_label(2 / 255) == "2/255"
    assert scoring.eps_label(0.031) == "0.031" and scoring.eps_label(1.0) == "1"


def test_accuracy_stats_t_interval_and_wilson():
    correct = np.zeros((3, 100), dtype=bool)
    for i, k in enumerate((50, 52, 54)):
        correct[i, :k] = True
    s = stats.accuracy_stats(correct)
    assert s["mean"] == 52.0 and s["std"] == 2.0 and s["correct"] == [50, 52, 54]
    assert s["ci95"] == [round(52 - 4.302653 * 2 / math.sqrt(3), 2), round(52 + 4.302653 * 2 / math.sqrt(3), 2)]
    one = stats.accuracy_stats(correct[:1])
    assert one["std"] is None and one["ci_method"].startswith("wilson") and one["ci95"] == one["ci95_wilson"]
    assert one["ci95"][0] < 50 < one["ci95"][1] and one["ci95"] == [40.38, 59.62]


def test_autocast_wrapper_keeps_noise_controls():
    model = build("en1resnet8", seed=0)
    wrapped = scoring.AutocastLogits(model, "cpu")
    x = torch.rand(2, 3, 32, 32)
    assert wrapped(x).dtype == torch.float32 and wrapped.has_noise and wrapped.noise_std == "batch"
    with scoring.noise_switched(wrapped, False):
        assert not model.noise_enabled
    assert model.noise_enabled
    wrapped.set_noise_std("sample")
    assert model.noise_std == "sample"
