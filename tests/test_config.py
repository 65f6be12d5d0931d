"""Loading params (issue 17, item 11): every malformed file is one ConfigError naming the key, at load time."""
from __future__ import annotations

import pytest

from paper_repro import config
from paper_repro.config import ConfigError

EXPERIMENT = "experiments:\n  r:\n    model: resnet8\n"


def load(tmp_path, text, overrides=None):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return config.load(path, overrides)


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: 2\n  epochs: 3\n" + EXPERIMENT, "duplicate key 'epochs' (lines 2 and 3)"),
    ("experiments:\n  r:\n    model: resnet8\n  r:\n    model: resnet20\n", "duplicate key 'r'"),
    ("- train\n- evaluate\n", "the top level must be a mapping of sections, got list"),
    ("train:\n  lr: .inf\n" + EXPERIMENT, "train.lr must be a finite number, got inf"),
    ("train:\n  lr: .nan\n" + EXPERIMENT, "train.lr must be a finite number"),
    ("experiments:\n  r:\n    model: resnet8\n    quantizer: ternary\n    quantizer_options: {scale: xx}\n",
     "experiments.r.quantizer_options: ternary scale must be one of ('ref', 'twn'), got 'xx'"),
    ("experiments:\n  r:\n    model: resnet8\n    quantizer: kbit\n", "kbit needs an integer bits in [2, 8], got None"),
    ("experiments:\n  r:\n    model: resnet8\n    quantizer: binary\n    quantizer_options: {bits: 2}\n",
     "scheme 'binary' takes options [], got unknown ['bits']"),
])
def test_malformed_params_are_one_line_errors_at_load(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_yaml_1_2_floats_are_numbers(tmp_path):
    """PyYAML reads 1e6 and 5e-4 as strings (YAML 1.1); params take them as the numbers they look like."""
    s = load(tmp_path, "train:\n  lr: 1e-1\n  weight_decay: 5e-4\n  momentum: 9E-1\n" + EXPERIMENT)
    assert (s.train.lr, s.train.weight_decay, s.train.momentum) == (0.1, 5e-4, 0.9)
    assert load(tmp_path, EXPERIMENT, ["train.lr=2e-2"]).train.lr == 0.02
    with pytest.raises(ConfigError, match="must be an integer"):
        load(tmp_path, "train:\n  epochs: 1e2\n" + EXPERIMENT)  # a float is not an epoch count


def test_a_choice_that_yaml_reads_as_a_boolean_is_the_word(tmp_path):
    """YAML 1.1 reads an unquoted off as False: amp: off is the choice "off", from the file and from --set; a boolean
    word that is no choice is refused, saying why."""
    assert load(tmp_path, "train:\n  amp: off\n" + EXPERIMENT).train.amp == "off"
    assert load(tmp_path, EXPERIMENT, ["train.amp=off", "evaluate.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train.compile must be one of .*, got True \(YAML reads yes/no"):
        load(tmp_path, EXPERIMENT, ["train.compile=yes"])


def test_overrides_are_checked_like_the_file(tmp_path):
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        load(tmp_path, EXPERIMENT, ["train.lr=.inf"])
    with pytest.raises(ConfigError, match="duplicate key"):
        load(tmp_path, EXPERIMENT, ["train.pgd={steps: 1, steps: 2}"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(tmp_path, EXPERIMENT, ["train.lr=[1"])


def test_quantizer_options_with_defaults_are_shared_with_the_quantizers():
    from paper_repro.quant import check_scheme
    assert config.quantizer_options("ternary", {}) == check_scheme("ternary") == {"scale": "ref"}
    assert check_scheme("kbit", bits=3) == {"bits": 3}
    with pytest.raises(ValueError, match="unknown quantizer scheme"):
        check_scheme("5bit")
