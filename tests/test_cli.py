"""The information commands of the CLI (`loracl methods [NAME]`, `loracl benchmarks`, `--help`): what they
print, that they import no torch (which is what keeps them under a second; benchmarks/cli_time.py times
them), and that the torch-free method catalog they read agrees with the method implementations."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loracl.cli import main
from loracl.errors import ConfigError
from loracl.methods import CATALOG, available_methods, create_method, method_class
from loracl.methods.base import ContinualMethod

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HEAVY = ("torch", "transformers", "peft", "accelerate", "matplotlib")
METADATA = ("summary", "data_free", "memory_growth", "role", "trains", "joint_training", "merge_obstacle")


def printed(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- loracl methods ---------------------------------------------------------------------------------------


def test_methods_lists_every_method_and_points_to_the_details(capsys):
    code, out, err = printed(["methods"], capsys)
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert names[: len(CATALOG)] == list(CATALOG)
    replay = "data-free: no; memory in T: constant (one LoRA + a memory of memory_size examples); options: "
    assert replay + "memory_size, memory_batch_size" in out
    assert out.rstrip().splitlines()[-1].startswith("loracl methods NAME: ")


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "slao",
            [
                f"slao: {CATALOG['slao'].summary}",
                f"role: continual; data-free: yes; memory in T: {CATALOG['slao'].memory_growth}",
                "options (method.KEY in a config, --set method.KEY=VALUE, bench --methods slao:KEY=VALUE):",
                "  init: last_ft | last_merge | random (default: last_ft)",
                "  schedule: inv_sqrt | inv | constant (default: inv_sqrt)",
                "  constant: float (default: 0.5)",
                "      λ(i) when schedule is constant",
                "  rebase_b: bool (default: false)",
            ],
        ),
        (
            "gainlora",
            [
                f"export --merge: refused ({CATALOG['gainlora'].merge_obstacle})",
                "  threshold: float in (0, 1] (default: 0.995)",
                "  max_examples: int > 0 or null (default: null)",
                "  a_scale: float > 0 (default: 0.57735)",
                "      norm of each row of the designed A (the authors' 1/sqrt(3))",
                "  keep_row_norms: bool (default: true)",
            ],
        ),
        (
            "gpm",
            [
                "  threshold_step: float >= 0 (default: 0.003)",
                "      its rise per task (capped at 1)",
                "  max_examples: int > 0 (default: 125)",
            ],
        ),
        (
            "replay",
            [
                "role: continual; data-free: no; memory in T: constant (one LoRA + a memory of memory_size "
                "examples)",
                "  memory_batch_size: int > 0 or null (default: null)",
                "      examples drawn from the memory per training step (default: train.batch_size)",
            ],
        ),
        (
            "mtl",
            [
                f"role: upper bound; data-free: no; memory in T: {CATALOG['mtl'].memory_growth}",
                "training: once, on the union of every task's data (only AP is defined)",
                "options: none",
            ],
        ),
        ("zero_shot", ["training: none (the base model is evaluated once)", "options: none"]),
    ],
)
def test_one_methods_options_types_defaults_and_descriptions(name, expected, capsys):
    code, out, err = printed(["methods", name], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    for line in expected:
        assert line in lines, line


def test_every_option_is_listed_with_a_description(capsys):
    for name, spec in CATALOG.items():
        _, out, _ = printed(["methods", name], capsys)
        for key, field in spec.options.model_fields.items():
            assert field.description, f"{name}: option {key} has no description"
            assert f"\n  {key}: " in out, (name, key)


def test_an_unknown_method_is_one_line_with_a_suggestion(capsys):
    code, out, err = printed(["methods", "sloa"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: unknown method 'sloa' (did you mean 'slao'?); known: agem, ewc, ")
    assert err.count("\n") == 1
    code, _, err = printed(["methods", "nothing_like_it"], capsys)
    assert code == 2 and "did you mean" not in err and err.count("\n") == 1


def test_benchmarks_lists_formats_and_orders(capsys):
    code, out, err = printed(["benchmarks"], capsys)
    assert code == 0 and err == ""
    assert out.startswith("benchmarks: ") and "order1: dbpedia, amazon, yahoo, agnews" in out


# --- no torch on the information paths --------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys

    import loracl.methods
    from loracl.cli import build_parser, main

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(["--help"])
        except SystemExit:
            pass
        build_parser().parse_args(["methods"])
        codes = [main(["methods"]), main(["methods", "slao"]), main(["benchmarks"])]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
    print(json.dumps({"codes": codes, "heavy": heavy}))
    """
)


def test_help_methods_and_benchmarks_import_no_torch():
    """What keeps these commands under a second: importing torch alone takes seconds on a busy CPU."""
    done = subprocess.run([sys.executable, "-c", PROBE, *HEAVY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"codes": [0, 0, 0], "heavy": []}


# --- the catalog agrees with the implementations ----------------------------------------------------------


def test_the_catalog_and_the_implementation_classes_agree():
    classes = available_methods()  # every registered method, each implementation imported
    assert list(classes) == list(CATALOG), "a method is registered but not in loracl.methods.catalog"
    for name, spec in CATALOG.items():
        cls = spec.load()
        assert cls is classes[name] and issubclass(cls, ContinualMethod)
        assert cls.name == spec.name == name
        assert f"{cls.__module__}:{cls.__qualname__}" == spec.implementation
        assert cls.Options is spec.options, name  # the same class, not a copy
        for attribute in METADATA:
            assert getattr(cls, attribute) == getattr(spec, attribute), (name, attribute)


def test_the_options_defaults_repeat_the_subspace_constants():
    from loracl.methods import options
    from loracl.models import subspace

    for constant in ("GPM_THRESHOLD", "GPM_THRESHOLD_STEP", "DUAL_GPM_THRESHOLD", "DUAL_GPM_TASKS"):
        assert getattr(options, constant) == getattr(subspace, constant), constant


def test_the_registry_resolves_implementations_lazily_with_the_same_errors():
    from loracl.config import LoraSection

    assert method_class("slao") is CATALOG["slao"].load()
    method = create_method("ewc", {"lam": 2.0}, LoraSection(r=2))
    assert method.name == "ewc" and method.options.lam == 2.0
    with pytest.raises(ConfigError) as info:
        method_class("sloa")
    known = ", ".join(CATALOG)
    assert str(info.value) == f"method.name: unknown method 'sloa' (did you mean 'slao'?); known: {known}"
    with pytest.raises(ConfigError, match=r"^method\.lamb: unknown option for method 'ewc' \(did you mean"):
        create_method("ewc", {"lamb": 1.0}, LoraSection(r=2))


# --- the timing script ------------------------------------------------------------------------------------


def test_cli_time_prints_a_figure_per_command():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cli_time.py"), "--repeats", "1"], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _, found, block = done.stdout.rpartition("== figures ==\n")
    figures = dict(line.split(": ") for line in block.splitlines())
    assert found and set(figures) == {
        "loracl_help_s",
        "loracl_methods_s",
        "loracl_methods_name_s",
        "loracl_benchmarks_s",
    }
    assert all(float(value) > 0 for value in figures.values())


def test_folder_options_are_recorded_absolute(tmp_path, monkeypatch):
    """--init-adapter, --guard-set and continue's --data-dir become absolute config values, so a --resume
    (or continue) from another working directory finds the same folders."""
    from loracl.cli import build_parser

    monkeypatch.chdir(tmp_path)
    run = build_parser().parse_args(["run", "--init-adapter", "a", "--guard-set", "g", "--set", "lora.r=4"])
    adapter, guard = tmp_path / "a", tmp_path / "g"
    assert run.overrides == [f'lora.init_adapter="{adapter}"', f'versions.guard_set="{guard}"', "lora.r=4"]
    extend = build_parser().parse_args(["continue", "RUN", "--tasks", "t", "--data-dir", "d"])
    assert extend.overrides == [f'benchmark.data_dir="{tmp_path / "d"}"']
