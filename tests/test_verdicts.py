"""Verdicts a reviewer can trust (issue 11): right pairs, right runs, comparability from the recipe
in effect, C1 against a baseline, inconclusive when neither arm shows an effect, intervals that
include test-set sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_metrics import simple_metrics, write_tree
from paper_repro import checks, stats, verify
from paper_repro import claims as C
from paper_repro import verdicts as V

ACC = ("natural", "fgsm", "ifgsm20", "cw_ref")


def run(name: str, loss: str, natural: float, *, loss_params: dict | None = None, **kw) -> dict:
    acc = {"natural": natural, "fgsm": 50.0, "ifgsm20": 45.0, "cw_ref": 60.0}
    return simple_metrics(name, loss=loss, acc=acc, loss_params=loss_params, **kw)


# --------------------------------------------------------------------------- 1. pairs
def test_sweep_runs_are_not_paired_with_pgd_at():
    base = run("pgd", "pgd_at", 70.0)
    paper_weights = run("tradeoff", "tradeoff", 76.0)
    sweep = run("tradeoff-wadv1", "tradeoff", 60.0, loss_params={"w_adv": 1.0, "w_nat": 1.0})
    result = checks.tradeoff_recovers_natural([base, paper_weights, sweep])
    assert [(e["pgd_at"], e["tradeoff"]) for e in result.evidence] == [("pgd", "tradeoff")]
    assert result.outcome == stats.HOLDS and "tradeoff-wadv1" not in result.runs
    # the sweep is evidence only when a check asks for its weights explicitly
    asked = checks.tradeoff_recovers_natural([base, paper_weights, sweep], tradeoff={"w_adv": 1, "w_nat": 1})
    assert [e["tradeoff"] for e in asked.evidence] == ["tradeoff-wadv1"] and asked.outcome == stats.FAILS


@pytest.mark.parametrize("field, value", [
    ("profile", "cpu"), ("noise", False), ("method", "BC"), ("quantizer_options", {"scale": "twn"}),
])
def test_pairs_need_every_field_but_the_loss_to_agree(field, value):
    base = run("pgd", "pgd_at", 70.0)
    other = run("tradeoff", "tradeoff", 76.0)
    other[field] = value
    assert checks.pairs([base, other], ("pgd_at", None), ("tradeoff", None)) == []
    assert checks.tradeoff_recovers_natural([base, other]).outcome is None


def test_pairs_need_the_same_training_recipe():
    base = run("pgd", "pgd_at", 70.0)
    other = run("tradeoff", "tradeoff", 76.0)
    other["training"]["settings"]["epochs"] = 5  # e.g. --set train.epochs=5 for one run only
    assert checks.tradeoff_recovers_natural([base, other]).outcome is None


# --------------------------------------------------------------------------- 2. one named run
def test_missing_named_run_is_not_run_even_with_a_look_alike():
    claim = C.validate({"schema_version": 1, "sources": {"s": {"title": "t", "ref": "r"}}, "qualitative": [],
                        "numeric": [{"id": "x", "source": "s", "citation": "c", "table": "T", "row": "r",
                                     "column": "A1", "dataset": "cifar10", "value": 76.0, "tolerance": 2.0,
                                     "maps_to": {"run": "en1resnet20-ternary-br-tradeoff",
                                                 "metric": "accuracy.natural.mean",
                                                 "select": {"model": "en1resnet20", "loss": "tradeoff"}}}]}).numeric[0]
    look_alike = run("en1resnet20-ternary-br-tradeoff-wadv1", "tradeoff", 76.0, loss_params={"w_adv": 1, "w_nat": 1})
    row = verify.evaluate_numeric(claim, [look_alike])
    assert row["verdict"] == V.NOT_RUN and row["run"] is None
    assert "no run named en1resnet20-ternary-br-tradeoff" in row["detail"] and "wadv1" in row["detail"]
    # the named run exists but is not what the registry says: a registry error, never a verdict
    wrong = run("en1resnet20-ternary-br-tradeoff", "pgd_at", 76.0)
    row = verify.evaluate_numeric(claim, [wrong])
    assert row["verdict"] == V.REGISTRY_ERROR and "registry error" in row["detail"]


def test_a_cifar10_number_never_resolves_to_a_run_on_another_dataset():
    """CIFAR-10 entries leave the dataset out of their select; a profile with data.dataset cifar100 names its
    runs as the CIFAR-10 grid does, so the dataset is always required (CIFAR-10 when the select leaves it out)."""
    maps_to = C.MapsTo(run="resnet20-fp-pgd_at", metric="accuracy.natural.mean",
                       select={"model": "resnet20", "quantizer": "none", "loss": "pgd_at"})
    c100 = simple_metrics("resnet20-fp-pgd_at", "resnet20", "none", "none", "pgd_at", acc={"natural": 55.0})
    c100["data"]["dataset"] = "cifar100"
    run_, why = V.resolve_run([c100], maps_to)
    assert run_ is None and why == "no CIFAR-10 run named resnet20-fp-pgd_at: the run of that name is on CIFAR-100"
    claim = C.validate({"schema_version": 1, "sources": {"s": {"title": "t", "ref": "r"}}, "qualitative": [],
                        "numeric": [{"id": "x", "source": "s", "citation": "c", "table": "T", "row": "r",
                                     "column": "A1", "dataset": "cifar10", "value": 75.0, "tolerance": 2.0,
                                     "maps_to": {"run": maps_to.run, "metric": maps_to.metric,
                                                 "select": dict(maps_to.select)}}]}).numeric[0]
    row = verify.evaluate_numeric(claim, [c100])
    assert row["verdict"] == V.NOT_RUN and row["run"] is None and "CIFAR-100" in row["detail"]
    c10 = simple_metrics("resnet20-fp-pgd_at", "resnet20", "none", "none", "pgd_at", acc={"natural": 75.0})
    assert V.resolve_run([c10], maps_to) == (c10, "")  # documents without data.dataset are CIFAR-10
    # a CIFAR-100 number (its select names the dataset) never resolves to the CIFAR-10 run of its name
    on_c100 = C.MapsTo(run=maps_to.run, metric=maps_to.metric, select={**maps_to.select, "dataset": "cifar100"})
    assert V.resolve_run([c100], on_c100) == (c100, "")
    assert V.resolve_run([c10], on_c100)[0] is None


# --------------------------------------------------------------------------- 4. comparability
def test_comparability_is_computed_from_the_recipe_in_effect():
    good = run("pgd", "pgd_at", 70.0)
    assert V.deviations(good) == [] and V.is_comparable(good)
    short = run("pgd", "pgd_at", 70.0, n=1000)  # labelled "paper", official data, but 5 epochs and PGD-5 on 10k images
    short["training"]["settings"].update(epochs=5, pgd={**short["training"]["settings"]["pgd"], "steps": 5})
    short["training"]["split"]["train_images"] = 10000
    short["seeds"] = [0]
    devs = V.deviations(short)
    assert not V.is_comparable(short)
    for text in ("epochs 5 vs 200", "PGD-5 vs PGD-10 training attack", "10,000 training images vs 45,000",
                 "1,000 test images vs 10,000", "1 noise seed(s) vs 5"):
        assert text in devs, (text, devs)
    assert "not the official CIFAR-10 data (synthetic)" in V.deviations(run("p", "pgd_at", 70.0, official=False))
    mixed = run("p", "pgd_at", 70.0)
    mixed["accuracy"]["cw_ref"]["n"] = 500  # per-attack sizes are named per attack
    assert "cw_ref on 500 test images vs 10,000" in V.deviations(mixed)
    unknown = run("p", "pgd_at", 70.0)
    del unknown["training"]
    assert any("recipe unknown" in d for d in V.deviations(unknown))


def test_not_comparable_verdicts_name_their_deviations():
    claim = C.load_registry()
    c3 = next(c for c in claim.qualitative if c.id == "C3")
    base, other = run("pgd", "pgd_at", 70.0), run("tradeoff", "tradeoff", 76.0)
    for m in (base, other):
        m["training"]["settings"]["epochs"] = 10
    row = verify.evaluate_qualitative(c3, [base, other])
    assert row["verdict"] == V.NOT_COMPARABLE and row["would_be"] == V.REPRODUCED
    assert "epochs 10 vs 200" in row["deviations"]


# --------------------------------------------------------------------------- 5. no phase 2
def test_a_run_that_never_trained_quantized_is_flagged():
    from paper_repro import config
    from paper_repro.train import warn_no_phase2

    m = run("q", "pgd_at", 70.0, quantizer="4bit", levels=15)
    m["training"].update(phase2_epochs=0, trained_quantized=False)
    assert any("never trained quantized" in d for d in V.deviations(m))
    result = checks.quantized_benchmark_complete([dict(m, quantizer=q, run=q) for q in ("binary", "ternary", "4bit")])
    assert result.outcome == stats.FAILS and "trained quantized False" in result.detail
    c7 = next(c for c in C.load_registry().qualitative if c.id == "C7")
    row = verify.evaluate_qualitative(c7, [dict(m, quantizer=q, run=q) for q in ("binary", "ternary", "4bit")])
    assert "never trained quantized" in row["detail"]
    settings = config.from_dict({"train": {"epochs": 3, "relax": {"hard_epoch": 3}},
                                 "experiments": {"q": {"model": "resnet20", "quantizer": "ternary"},
                                                 "f": {"model": "resnet20"}}})
    assert "no phase-2" in warn_no_phase2(settings, settings.experiment("q"))
    assert warn_no_phase2(settings, settings.experiment("f")) is None


# --------------------------------------------------------------------------- 6. identity
def test_identity_compares_the_whole_experiment(tmp_path: Path):
    from paper_repro import config
    from paper_repro.evaluate import check_identity, expected_identity

    settings = config.from_dict({"experiments": {
        "t": {"model": "en1resnet20", "quantizer": "4bit", "loss": "tradeoff", "loss_params": {"w_adv": 2}}}})
    e = settings.experiment("t")
    sidecar = expected_identity(e)
    check_identity(e, sidecar, tmp_path)  # the same experiment passes
    for key, value in (("loss_params", {"w_adv": 8.0, "w_nat": 1.0}), ("method", "BC"), ("noise", False),
                       ("quantizer_options", {"scale": "twn"})):
        with pytest.raises(config.ConfigError, match=key):
            check_identity(e, {**sidecar, key: value}, tmp_path)
    with pytest.raises(config.ConfigError, match="does not record 'noise'"):
        check_identity(e, {k: v for k, v in sidecar.items() if k != "noise"}, tmp_path)


# --------------------------------------------------------------------------- 7. C1 baseline
def test_c1_needs_more_sparsity_than_the_quantizer_gives_an_untrained_network():
    untrained = [simple_metrics("t", quantizer="ternary", weight=42.0, init_weight=42.0),
                 simple_metrics("f", quantizer="4bit", weight=23.0, init_weight=23.0)]
    assert checks.quantized_weights_sparse(untrained).outcome != stats.HOLDS
    trained = [simple_metrics("t", quantizer="ternary", weight=50.0, init_weight=42.0),
               simple_metrics("f", quantizer="4bit", weight=35.0, init_weight=23.0)]
    result = checks.quantized_weights_sparse(trained)
    assert result.outcome == stats.HOLDS
    assert result.evidence[0]["at init"] == 42.0 and "initialisation" in result.detail
    sparser_init = [simple_metrics("t", quantizer="ternary", weight=30.0, init_weight=42.0)]
    assert checks.quantized_weights_sparse(sparser_init).outcome == stats.FAILS


# --------------------------------------------------------------------------- 8. inconclusive
def test_no_effect_in_either_arm_is_inconclusive_not_a_failure():
    pair = [simple_metrics("a", loss="pgd_at", channel=0.0), simple_metrics("b", loss="tradeoff", channel=0.0)]
    result = checks.tradeoff_raises_channel_sparsity(pair)
    assert result.outcome == stats.INCONCLUSIVE and "no effect in either arm" in result.detail
    c4 = next(c for c in C.load_registry().qualitative if c.id == "C4")
    assert verify.evaluate_qualitative(c4, pair)["verdict"] == V.INCONCLUSIVE
    # a small difference inside both arms' uncertainty is inconclusive too; a large one decides
    small = [simple_metrics("a", loss="pgd_at", channel=1.0), simple_metrics("b", loss="tradeoff", channel=1.3)]
    assert checks.tradeoff_raises_channel_sparsity(small).outcome == stats.INCONCLUSIVE
    large = [simple_metrics("a", loss="pgd_at", channel=1.0), simple_metrics("b", loss="tradeoff", channel=12.0)]
    assert checks.tradeoff_raises_channel_sparsity(large).outcome == stats.HOLDS


def test_small_accuracy_differences_on_few_images_are_inconclusive():
    base = run("pgd", "pgd_at", 40.0, n=500)
    other = run("tradeoff", "tradeoff", 42.0, n=500)  # +2 pp on 500 images: within sampling error
    assert checks.tradeoff_recovers_natural([base, other]).outcome == stats.INCONCLUSIVE
    base, other = run("pgd", "pgd_at", 40.0, n=10000), run("tradeoff", "tradeoff", 42.0, n=10000)
    assert checks.tradeoff_recovers_natural([base, other]).outcome == stats.HOLDS


# --------------------------------------------------------------------------- 9. intervals
def test_interval_includes_test_set_sampling_for_a_deterministic_model():
    e = stats.accuracy_estimate([60.0, 60.0, 60.0], n=1000)  # no spread over seeds
    assert e.hi - e.lo > 5.0  # Wilson on 1,000 images: about +-3 pp
    lo, hi = stats.wilson(600, 1000)
    assert (round(e.lo, 2), round(e.hi, 2)) == (round(lo, 2), round(hi, 2))
    wide = stats.accuracy_estimate([58.0, 62.0, 60.0], n=1000)
    assert wide.lo < e.lo and wide.hi > e.hi  # seed spread widens it
    single = stats.accuracy_estimate([60.0], n=1000)
    assert single.lo == e.lo and "1 seed" in single.how
    m = simple_metrics("r", acc={"natural": 60.0}, n=1000)
    measured = V.measure(m, "accuracy.natural.mean")
    assert measured.ci95[1] - measured.ci95[0] > 5.0 and "Wilson" in measured.ci_method


def test_report_header_prints_the_rules(tmp_path: Path):
    paths = write_tree(tmp_path)
    report = verify.run(paths["metrics"], paths["reports"], quiet=True)
    text = (paths["reports"] / "verification.md").read_text()
    assert "Wilson" in text and "inconclusive" in text and "deviations" in text.lower()
    assert set(report["rules"]) == {"numbers", "checks", "intervals", "comparability"}
    assert json.loads((paths["reports"] / "verification.json").read_text())["rules"] == report["rules"]


def test_synthetic_tree_with_sweep_runs(tmp_path: Path):
    """The paper grid's shape: the PGD-AT run is paired with the w_adv 8 run only, never the sweep."""
    runs = [("en1resnet20", "4bit", "BR", "pgd_at", {}),
            ("en1resnet20", "4bit", "BR", "tradeoff", {"w_adv": 8.0, "w_nat": 1.0})]
    runs += [("en1resnet20", "4bit", "BR", "tradeoff", {"w_adv": w, "w_nat": 1.0}) for w in (1.0, 2.0, 4.0, 16.0)]
    paths = write_tree(tmp_path, runs=runs, official=True, profile="paper", with_weights=False)
    report = verify.run(paths["metrics"], paths["reports"], quiet=True)
    rows = {r["id"]: r for r in report["qualitative"]}
    for cid in ("C3", "C4", "C5"):
        paired = {e["tradeoff"] for e in rows[cid]["evidence"]}
        assert paired == {"en1resnet20-4bit-br-tradeoff"}, (cid, paired)


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path):
    import os

    from paper_repro import atomic

    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
