"""Comparability is judged from what was in effect: the precision a run trained and was evaluated in (bf16 autocast
under amp "auto" on CUDA included) and how each paper column was run (function, options, EOT, noise), against
recipe.py; documents that do not record it are judged conservatively."""
from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_metrics import simple_metrics
from paper_repro import comparability, config, recipe

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"  # runtime.device_name on CUDA: the GPU's name
CPU = "cpu (2 cores, 1 threads)"  # runtime.device_name off CUDA


def paper_run(**kw) -> dict:
    return simple_metrics("r", acc={"natural": 77.0, "fgsm": 55.0, "ifgsm20": 49.0, "cw_ref": 65.0}, **kw)


def test_the_paper_fixture_is_comparable():
    assert comparability.deviations(paper_run()) == []


# --------------------------------------------------------------------------- D4: precision in effect
@pytest.mark.parametrize("amp, device, expected", [
    ("auto", GPU, ["bf16 autocast training vs fp32"]),  # the paper profile's amp: auto on a GPU ran bf16
    ("auto", CPU, []),
    ("auto", None, ["training amp auto: precision in effect not recorded (bf16 autocast on CUDA, fp32 on CPU)"]),
    ("bf16", CPU, ["bf16 autocast training vs fp32"]),  # the published CPU bundle's (explicit) setting
    ("off", GPU, []),
])
def test_training_precision_of_metrics_without_amp_in_effect(amp, device, expected):
    m = paper_run()
    m["training"]["settings"]["amp"] = amp
    m["provenance"]["device"] = device
    assert comparability.deviations(m) == expected


def test_a_configured_device_decides_auto_without_the_recorded_name():
    m = paper_run()
    m["training"]["settings"].update(amp="auto", device="cuda:1")
    m["provenance"]["device"] = None
    assert comparability.deviations(m) == ["bf16 autocast training vs fp32"]
    m["training"]["settings"]["device"] = "cpu"
    assert comparability.deviations(m) == []


def test_recorded_amp_in_effect_wins_over_the_label():
    m = paper_run()
    m["training"]["settings"]["amp"] = "auto"
    m["provenance"]["device"] = CPU
    m["training"]["amp_in_effect"] = True
    assert comparability.deviations(m) == ["bf16 autocast training vs fp32"]
    m["provenance"]["device"] = GPU
    m["training"]["amp_in_effect"] = False
    assert comparability.deviations(m) == []


@pytest.mark.parametrize("amp, eval_device, in_effect, expected", [
    ("auto", GPU, None, ["bf16 autocast evaluation vs fp32"]),
    ("auto", CPU, None, []),
    ("auto", None, None, ["evaluation amp auto: precision in effect not recorded (bf16 autocast on CUDA, fp32 on CPU)"]),
    ("bf16", CPU, None, ["bf16 autocast evaluation vs fp32"]),
    ("off", GPU, None, []),
    ("auto", CPU, True, ["bf16 autocast evaluation vs fp32"]),
    ("auto", GPU, False, []),
])
def test_evaluation_precision(amp, eval_device, in_effect, expected):
    m = paper_run()
    m["settings"] = {"amp": amp, "device": "auto"}
    m["provenance"]["eval_device"] = eval_device
    if in_effect is not None:
        m["amp_in_effect"] = in_effect
    assert comparability.deviations(m) == expected


# --------------------------------------------------------------------------- D5: how the paper columns ran
def with_settings(key: str, **change) -> dict:
    m = paper_run()
    m["accuracy"][key]["settings"].update(change)
    return m


@pytest.mark.parametrize("key, change, expected", [
    ("cw_ref", {"options": {"variant": "spec"}}, "cw_ref (A4) option variant 'spec' vs 'aliased'"),
    ("cw_ref", {"options": {}}, "cw_ref (A4) option variant unset (the function's default) vs 'aliased'"),
    ("cw_ref", {"options": {"variant": "aliased", "steps": 10}},
     "cw_ref (A4) option steps 10 vs unset (the function's default)"),
    ("cw_ref", {"function": "cw_linf"}, "cw_ref (A4) attack cw_linf vs cw_ref"),
    ("ifgsm20", {"function": "pgd", "options": {"steps": 20}}, "ifgsm20 (A3) attack pgd vs ifgsm20"),
])
def test_each_paper_column_is_run_as_the_paper_ran_it(key, change, expected):
    devs = comparability.deviations(with_settings(key, **change))
    assert expected in devs, devs


def test_eot_and_noise_of_a_paper_column():
    m = paper_run()
    m["accuracy"]["fgsm"]["eot"] = 10  # the EOT used (evaluate records 1 on a model without active noise)
    assert comparability.deviations(m) == ["fgsm (A2) EOT 10 vs 1"]
    m = paper_run()
    m["accuracy"]["cw_ref"]["noise"] = False  # the noisy model attacked with its noise switched off
    assert comparability.deviations(m) == ["cw_ref (A4) with the model's noise off vs on"]
    m = paper_run()
    m["accuracy"]["cw_ref"]["settings"]["noise"] = False  # no effective value recorded: the configured one
    assert comparability.deviations(m) == ["cw_ref (A4) with the model's noise off vs on"]
    plain = paper_run(model="resnet20")
    plain["noise_active"] = False  # a plain resnet has no noise: noise off is what the paper's ResNet20 did too
    plain["accuracy"]["cw_ref"]["noise"] = False
    assert comparability.deviations(plain) == []


def test_unrecorded_attack_settings_are_named():
    m = paper_run()
    m["accuracy"]["cw_ref"]["settings"] = {}
    assert comparability.deviations(m) == ["cw_ref (A4) attack settings not recorded: how it was run is unknown"]


def test_every_profile_runs_the_paper_columns_as_the_paper():
    """The paper profile's attacks (params.yaml, the code defaults and every profile) are the recipe's: recorded as
    evaluate records them (scoring.run_job's settings), they raise no deviation."""
    default = config.EvaluateSettings().attacks
    profiles = [config.load(ROOT / "params.yaml").evaluate.attacks, default]
    profiles += [config.load(p).evaluate.attacks for p in sorted((ROOT / "profiles").glob("*/params.yaml"))]
    for attacks in profiles:
        for key in recipe.PAPER_ATTACKS:
            spec = attacks[key]
            entry = {"eps": spec.eps, "eot": spec.eot, "noise": spec.noise,
                     "settings": {"function": spec.attack, "options": dict(spec.options), "eot": spec.eot,
                                  "noise": spec.noise, "noisy_only": spec.noisy_only}}
            assert comparability.attack_deviations(key, entry, noisy=True) == [], (key, spec)


# --------------------------------------------------------------------------- the noise of old documents
def test_noise_of_documents_without_noise_active_follows_the_architecture():
    plain = paper_run(model="resnet20")  # "noise": true is the experiment's flag; a plain resnet has no noise layers
    plain["seeds"] = [0]
    assert "1 noise seed(s) vs 5" not in comparability.deviations(plain)
    noisy = paper_run(model="en1resnet20")
    noisy["seeds"] = [0]
    assert "1 noise seed(s) vs 5" in comparability.deviations(noisy)
