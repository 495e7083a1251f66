"""Methods from outside the package: entry points of the group `loracl.methods` (the example plugin of
examples/loracl_example_plugin, exposed as `pip install -e` would: its source folder and a .dist-info on
sys.path, and on PYTHONPATH for subprocesses; spawned bench workers inherit sys.path), plugins that fail
to load, `register` replacing a name, and method state classes for checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from test_resume import SMALL  # two tasks of two training steps each

from loracl.cli import main
from loracl.config import LoraSection, load_config
from loracl.errors import CheckpointError, ConfigError
from loracl.methods import (
    CATALOG,
    ContinualMethod,
    catalog,
    method_class,
    register,
    register_state_class,
    unregister,
)
from loracl.methods.seq_lora import SeqLoRA
from loracl.recipes import run as runner
from loracl.recipes.checkpoint import check_method_state
from loracl.recipes.run import run

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "loracl_example_plugin"
TINY = ROOT / "configs" / "tiny.yaml"
HEAVY = ("torch", "transformers", "peft", "accelerate", "matplotlib")


def fake_distribution(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """The metadata `pip install` writes for a distribution with entry points of group loracl.methods."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{catalog.ENTRY_POINT_GROUP}]\n{lines}")


def example_entry_points() -> dict[str, str]:
    """The entry points the example's pyproject.toml declares (what `pip install` would record)."""
    if tomllib is None:
        return {"l2_anchor": "loracl_example_plugin.spec:L2_ANCHOR"}
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["version"]) == ("loracl-example-plugin", "0.1.0")
    return project["entry-points"][catalog.ENTRY_POINT_GROUP]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A site folder holding the example plugin's distribution metadata, on sys.path with the example's
    source (and on PYTHONPATH for subprocesses); what the test registered or loaded is forgotten after."""
    folder = tmp_path / "site"
    fake_distribution(folder, "loracl-example-plugin", "0.1.0", example_entry_points())
    paths = [str(EXAMPLE / "src"), str(folder)]
    for path in reversed(paths):
        monkeypatch.syspath_prepend(path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, str(ROOT / "src")]))
    yield folder
    for name in [*catalog.known_names(), "seq_lora", "notebook_method", "memo_method"]:
        if name not in CATALOG or name == "seq_lora":
            unregister(name)


def small_config(method: str, *extra: str):
    return load_config(TINY, [*SMALL, f"method.name={method}", *extra])


# --- loracl methods ---------------------------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys

    from loracl.cli import build_parser, main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            build_parser().parse_args(["--help"])
        except SystemExit:
            pass
        codes = [main(["methods"]), main(["methods", "l2_anchor"])]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
    print(json.dumps({"codes": codes, "heavy": heavy, "out": out.getvalue()}))
    """
)


def test_methods_lists_a_plugin_from_its_spec_without_importing_torch(site: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *HEAVY], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["codes"] == [0, 0] and report["heavy"] == []  # the entry point names a torch-free spec
    out = report["out"]
    assert "\nl2_anchor " in out and "options: strength; plugin: loracl-example-plugin 0.1.0" in out
    assert "plugin: loracl-example-plugin 0.1.0 (implementation loracl_example_plugin.method:L2Anchor)" in out
    assert "  strength: float >= 0 (default: 1.0)" in out
    assert "loracl_example_plugin.method" not in [m for m in sys.modules if m.startswith("loracl_example")]


def test_failing_plugins_are_one_line_each_and_the_rest_still_works(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fake_distribution(
        site,
        "broken-plugin",
        "2.0",
        {
            "missing": "no_such_module_here:SPEC",  # its import fails
            "slao": "loracl_example_plugin.spec:L2_ANCHOR",  # a built-in's name
            "misnamed": "loracl_example_plugin.spec:L2_ANCHOR",  # names a spec of another name
            "not_a_method": "loracl_example_plugin.spec:L2AnchorOptions",  # neither spec nor method
        },
    )
    assert main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    failed = {line.split()[0]: line for line in out.splitlines() if "FAILED TO LOAD" in line}
    assert sorted(failed) == ["misnamed", "missing", "not_a_method", "slao"]
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in failed["missing"]
    assert "of broken-plugin 2.0" in failed["missing"]
    assert "the name of a built-in method" in failed["slao"]
    assert "its method is named 'l2_anchor'" in failed["misnamed"]
    assert "L2AnchorOptions is not a ContinualMethod subclass" in failed["not_a_method"]
    assert "\nl2_anchor " in out and "\nslao " in out  # listed all the same
    assert method_class("slao") is CATALOG["slao"].load()  # the built-in is not touched

    assert main(["methods", "missing"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "No module named 'no_such_module_here'" in err

    out_dir = tmp_path / "run"
    assert main(["run", str(TINY), "--set", "method.name=missing", "--output", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: method.name: plugin method 'missing' cannot be loaded (entry point ")
    assert err.count("\n") == 1 and not out_dir.exists()
    with pytest.raises(ConfigError, match="unknown method 'l2_anchr' \\(did you mean 'l2_anchor'\\?\\)"):
        method_class("l2_anchr")


PLUGIN_CLASS = '''
from loracl.methods import ContinualMethod


class SeqCopy(ContinualMethod):
    name = "seq_copy"
    summary = "seq_lora again, declared by its class"


class Disagrees(ContinualMethod):
    name = "disagrees"
    summary = "a class whose spec says otherwise"
    data_free = False
'''
PLUGIN_SPEC = '''
from loracl.methods import MethodSpec

DISAGREES = MethodSpec(
    name="disagrees", summary="a class whose spec says otherwise", implementation="{module}:Disagrees"
)
'''


def test_an_entry_point_may_name_the_class_and_a_spec_must_agree_with_its_class(site: Path) -> None:
    (site / "class_plugin.py").write_text(PLUGIN_CLASS)
    (site / "class_plugin_spec.py").write_text(PLUGIN_SPEC.format(module="class_plugin"))
    entry_points = {"seq_copy": "class_plugin:SeqCopy", "disagrees": "class_plugin_spec:DISAGREES"}
    fake_distribution(site, "class-plugin", "1.0", entry_points)
    cls = method_class("seq_copy")
    assert cls.__module__ == "class_plugin" and cls.name == "seq_copy"
    assert catalog.lookup("seq_copy").origin == "class-plugin 1.0"
    with pytest.raises(ConfigError, match="plugin method 'disagrees' .*has data_free False, its spec True"):
        method_class("disagrees")


# --- runs, resume and bench with the example plugin --------------------------------------------------------


def test_plugin_run_interrupted_then_resumed_matches_an_uninterrupted_run(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_resume import SimulatedCrash, assert_same_outcome, crash, fail_in_task, finished_tasks, outcome

    config = small_config("l2_anchor", "method.strength=50")
    run(config, tmp_path / "whole")
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch, pytest.raises(SimulatedCrash):
        fail_in_task(patch, 2, crash)
        run(config, crashed)
    assert finished_tasks(crashed) == 1
    assert main(["run", "--resume", "--output", str(crashed)]) == 0  # the CLI finds it by its entry point
    assert_same_outcome(outcome(tmp_path / "whole"), outcome(crashed))
    info = json.loads((crashed / "results.json").read_text())["per_task"][1]["method_info"]
    assert info["distance_from_previous_anchor"] > 0  # the anchor of task 1 came back from the checkpoint


def test_bench_workers_resolve_the_plugin(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    caps = ["--max-train", "4", "--max-test", "2", "--set", "train.max_length=64"]
    caps += ["--set", "eval.max_new_tokens=2"]
    args = ["bench", str(TINY), "--methods", "l2_anchor,l2_anchor:strength=0", "--orders", "COPA+SST-2"]
    assert main([*args, *caps, "--jobs", "2", "--output", str(out)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.count("finished in") == 2  # each cell in its own spawned worker
    results = [json.loads(p.read_text()) for p in out.glob("*/*/results.json")]
    assert len(results) == 2 and all(r["method"] == "l2_anchor" and r["complete"] for r in results)
    assert sorted(r["method_options"]["strength"] for r in results) == [0.0, 1.0]


# --- register ---------------------------------------------------------------------------------------------


def make_method(name: str, qualname: str, base: type = ContinualMethod) -> type:
    """A method class as a notebook cell defines it (the same module and name each time it is re-run)."""
    return type(qualname, (base,), {"name": name, "summary": "a notebook's method", "__module__": __name__,
                                    "__qualname__": qualname})  # fmt: skip


def test_registering_a_name_again_replaces_it(site: Path) -> None:
    first, again = make_method("notebook_method", "Cell"), make_method("notebook_method", "Cell")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cell re-run replaces its own class silently
        register(first)
        register(again)
    assert method_class("notebook_method") is again
    assert catalog.lookup("notebook_method").implementation == f"{__name__}:Cell"
    with pytest.warns(UserWarning, match=f"method 'notebook_method' \\({__name__}:Cell\\) replaced by"):
        register(make_method("notebook_method", "Other"))

    mine = make_method("seq_lora", "MySeqLoRA", SeqLoRA)
    with pytest.warns(UserWarning, match="built-in method 'seq_lora' \\(loracl.methods.seq_lora:SeqLoRA\\)"):
        register(mine)
    assert method_class("seq_lora") is mine
    register(SeqLoRA)  # the built-in's module imported again (e.g. reloaded): the replacement stays
    assert method_class("seq_lora") is mine
    assert catalog.listing()[0]["seq_lora"].implementation == f"{__name__}:MySeqLoRA"
    unregister("seq_lora")
    assert method_class("seq_lora") is SeqLoRA and catalog.lookup("seq_lora") is CATALOG["seq_lora"]
    unregister("notebook_method")
    with pytest.raises(ConfigError, match="unknown method 'notebook_method'"):
        method_class("notebook_method")

    with pytest.raises(ValueError, match="not a valid method name"):
        register(make_method("bad:name", "Bad"))
    with pytest.raises(TypeError, match="not a ContinualMethod subclass"):
        register(dict)  # type: ignore[arg-type]


# --- state classes ----------------------------------------------------------------------------------------


class Memo:
    """A state class of the method below."""

    def __init__(self, task: int) -> None:
        self.task = task


class Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle this")


class MemoMethod(SeqLoRA):
    name = "memo_method"
    summary = "seq_lora keeping a Memo"
    state_attributes = ("memo", "count")

    def __init__(self, options, lora) -> None:
        super().__init__(options, lora)
        self.memo: Memo | None = None
        self.count = 0

    def after_task(self, model, ctx) -> None:
        self.memo, self.count = Memo(ctx.index), ctx.index


def test_a_state_that_could_not_be_read_back_is_refused_when_saved(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = MemoMethod(MemoMethod.Options(), LoraSection(r=2))
    method.memo = Memo(1)
    with pytest.raises(CheckpointError) as info:
        check_method_state(method, method.state_dict())
    message = str(info.value)
    assert message.startswith("method 'memo_method': state attribute 'memo' cannot be checkpointed (it holds")
    assert f"{__name__}.Memo" in message and "register_state_class" in message and "\n" not in message
    method.memo = {"nested": [Unpicklable()]}
    with pytest.raises(CheckpointError, match="state attribute 'memo' .*TypeError: cannot pickle this"):
        check_method_state(method, method.state_dict())

    register(MemoMethod)
    out = tmp_path / "run"
    sets = [arg for item in [*SMALL, "method.name=memo_method"] for arg in ("--set", item)]
    assert main(["run", str(TINY), *sets, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: method 'memo_method': state attribute 'memo' cannot be checkpointed")
    assert err.count("\n") == 1
    assert not (out / "checkpoint" / "latest.json").exists()  # refused at save time, not found at resume

    from loracl.methods import base

    monkeypatch.setattr(base, "_STATE_CLASSES", dict(base._STATE_CLASSES))  # forgotten after the test
    register_state_class(Memo)
    method.memo = Memo(2)
    check_method_state(method, method.state_dict())  # registered: read back


def test_state_classes_must_be_importable() -> None:
    class Local:
        pass

    with pytest.raises(ValueError, match="inside a function"):
        register_state_class(Local)
    with pytest.raises(TypeError, match="not a class"):
        register_state_class(Memo(1))  # type: ignore[arg-type]


def test_the_runner_resolves_methods_through_the_registry() -> None:
    assert runner.create_method.__module__ == "loracl.methods.base"
