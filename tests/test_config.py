"""Config loading, overrides and their error messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loracl.config import build_config, load_config
from loracl.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_are_valid():
    demo = load_config(CONFIGS / "demo.yaml")
    assert (demo.model.name, demo.method.name, demo.benchmark.order) == ("smollm2-135m", "slao", "order1")
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert tiny.model.name == "tiny-random-llama" and len(tiny.benchmark.tasks) == 3


def test_dotted_overrides_take_yaml_values():
    c = load_config(CONFIGS / "tiny.yaml", ["train.lr=3e-4", "benchmark.tasks=[agnews,yelp]",
                                           "method.name=seq_lora", "train.seed=7", "method.merge=A"])
    assert c.train.lr == pytest.approx(3e-4)
    assert c.benchmark.tasks == ["agnews", "yelp"]
    assert c.method.name == "seq_lora" and c.train.seed == 7
    assert c.method_options() == {"merge": "A"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.lr=1", "unknown key 'trian' (did you mean 'train'?)"),
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("train.lr=abc", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.dtype=float8", "model.dtype"),
        ("train.lr", "expected KEY=VALUE"),
        ("train.lr.x=1", "'lr' is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("modle:\n  name: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'modle' \(did you mean 'model'\?\)"):
        load_config(bad)


def test_the_order_defaults_to_the_benchmarks_own():
    """No order and no tasks: the benchmark's own order (order1 for the CL benchmark); no null by hand."""
    from loracl.data import load_tasks

    config = load_config(None, ["benchmark.max_train=1", "benchmark.max_test=1"])
    assert config.benchmark.order is None
    assert [t.name for t in load_tasks(config)] == ["dbpedia", "amazon", "yahoo", "agnews"]
    superni = load_config(None, ["benchmark.name=superni", "benchmark.max_train=1", "benchmark.max_test=1"])
    assert len(load_tasks(superni)) == 3  # every task of the sample folder, with no order set by hand


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")))
def test_every_shipped_config_is_valid(path: Path) -> None:
    """The demo, tiny, GPU and paper presets validate (the presets name data folders the user sets)."""
    config = load_config(path)
    assert config.train.lr > 0 and config.eval.max_new_tokens > 0


def test_eval_split_defaults_to_test_and_validation_needs_a_fraction():
    assert build_config({}).eval.split == "test"
    with pytest.raises(ConfigError) as excinfo:
        build_config({"eval": {"split": "validation"}}, "x.yaml")
    message = str(excinfo.value)
    assert message.startswith("x.yaml: eval.split=validation needs benchmark.validation_fraction > 0")
    assert "\n" not in message
    config = build_config({"eval": {"split": "validation"}, "benchmark": {"validation_fraction": 0.2}})
    assert config.eval.split == "validation"
    with pytest.raises(ConfigError, match="eval.split: Input should be 'test' or 'validation'"):
        build_config({"eval": {"split": "dev"}})
