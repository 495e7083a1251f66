"""Damaged or edited run and adapter folders given to `loracl eval / export / predict` (issue 15): each is one
error line with exit status 2, and nothing in the folder (or beside the export target) changes.

  results.json, loracl_adapter.json, gates.safetensors, adapter sub-folders ... test_damaged_folder_is_refused
  an edited target_modules, which PEFT drops silently .......................... test_edited_target_modules_*
  the run-folder readers fuzzed (hypothesis) ................................... test_readers_never_crash_*
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export_safety import copy_run, refused, tiny_run

from loracl.errors import AdapterMismatchError, LoraclError
from loracl.models.base_model import tiny_random_llama
from loracl.models.multi_lora import read_manifest
from loracl.outputs.deploy import resolve_source
from loracl.outputs.loading import load_adapter

Damage = Callable[[Path], None]  # applied to a copy of a finished gainlora run


@pytest.fixture(scope="module")
def gainlora(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory, "gainlora")


@pytest.fixture(scope="module")
def slao(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory, "slao")


def edit_json(relative: str, change: Callable[[dict], object]) -> Damage:
    """A damage that rewrites a JSON object of the run after change(it) edited it in place."""

    def damage(run: Path) -> None:
        path = run / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return damage


def write(relative: str, content: bytes) -> Damage:
    return lambda run: (run / relative).write_bytes(content)


def cut(relative: str, keep: Callable[[int], int]) -> Damage:
    def damage(run: Path) -> None:
        data = (run / relative).read_bytes()
        (run / relative).write_bytes(data[: keep(len(data))])

    return damage


def remove(relative: str) -> Damage:
    def damage(run: Path) -> None:
        path = run / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


MANIFEST = "adapter/loracl_adapter.json"
GATES = "adapter/gates.safetensors"
CASES: dict[str, tuple[Damage, str]] = {  # name -> (damage, part of the error line)
    "results.json garbage": (write("results.json", b"\x00\xff{not json"), "results.json: not UTF-8"),
    "results.json invalid": (write("results.json", b'{"method": '), "results.json: invalid JSON"),
    "results.json a list": (write("results.json", b"[1, 2]"), "results.json: expected a JSON object"),
    "results.json unknown method": (edit_json("results.json", lambda r: r.update(method="nope")), "unknown"),
    "results.json bad dtype": (edit_json("results.json", lambda r: r.update(base_dtype=[])), "base_dtype"),
    "results.json another method": (
        edit_json("results.json", lambda r: r.update(method="inc_lora")),
        "results.json says the run used 'inc_lora'",
    ),
    "manifest garbage": (write(MANIFEST, b"\x89PNG\r\n"), "loracl_adapter.json: not UTF-8"),
    "manifest empty": (write(MANIFEST, b""), "loracl_adapter.json: invalid JSON"),
    "manifest not an object": (write(MANIFEST, b'["task1"]'), "expected a JSON object, got list"),
    "manifest wrong format": (
        edit_json(MANIFEST, lambda m: m.update(format="peft")),
        "unknown adapter format",
    ),
    "manifest version 2": (edit_json(MANIFEST, lambda m: m.update(version=2)), "unknown adapter format"),
    "adapters missing": (edit_json(MANIFEST, lambda m: m.pop("adapters")), "'adapters' must be a non-empty"),
    "adapters empty": (
        edit_json(MANIFEST, lambda m: m.update(adapters=[])),
        "'adapters' must be a non-empty",
    ),
    "adapters a string": (
        edit_json(MANIFEST, lambda m: m.update(adapters="task1")),
        "'adapters' must be a non-empty",
    ),
    "adapter name with /": (
        edit_json(MANIFEST, lambda m: m.update(adapters=["task1", "../run/adapter/task2"])),
        "is not a folder name",
    ),
    "adapter name with \\": (
        edit_json(MANIFEST, lambda m: m.update(adapters=["task1", "..\\task2"])),
        "is not a folder name",
    ),
    "adapter name ..": (edit_json(MANIFEST, lambda m: m.update(adapters=["task1", ".."])), "is not a folder"),
    "adapter listed twice": (
        edit_json(MANIFEST, lambda m: m.update(adapters=["task1", "task1"])),
        "'task1' is listed twice",
    ),
    "adapters out of order": (
        edit_json(MANIFEST, lambda m: m.update(adapters=["task2", "task1"])),
        "adapter 1 is 'task2'",
    ),
    "unknown method": (edit_json(MANIFEST, lambda m: m.update(method="nope")), "unknown method 'nope'"),
    "method edited to inc_lora": (
        edit_json(MANIFEST, lambda m: m.update(method="inc_lora")),
        "method 'inc_lora' does not use the extra state",
    ),
    "gates dropped from extra": (
        edit_json(MANIFEST, lambda m: m.update(extra={})),
        "method 'gainlora' needs the extra state",
    ),
    "gate count not the adapters'": (
        edit_json(MANIFEST, lambda m: m["extra"].update(gate_count=3)),
        "3 gates for 2 adapters",
    ),
    "gates file elsewhere": (
        edit_json(MANIFEST, lambda m: m["extra"].update(gates="../results.json")),
        "expected 'gates.safetensors'",
    ),
    "gate size not the file's": (
        edit_json(MANIFEST, lambda m: m["extra"].update(gate_hidden=10)),
        "does not hold the 2 gates the manifest describes",
    ),
    "gates missing": (remove(GATES), "gates.safetensors: file not found"),
    "gates truncated": (cut(GATES, lambda n: n - 100), "gates.safetensors: not a readable safetensors"),
    "gates empty": (write(GATES, b""), "gates.safetensors: not a readable safetensors"),
    "adapter sub-folder missing": (remove("adapter/task2"), "adapter folder task2/ is missing"),
    "adapter weights truncated": (
        cut("adapter/task1/adapter_model.safetensors", lambda n: n // 2),
        "task1/adapter_model.safetensors: not a readable safetensors",
    ),
    "adapter config garbage": (
        write("adapter/task1/adapter_config.json", b"{{"),
        "task1: not a readable PEFT adapter folder",
    ),
}
# A manifest edited on an adapter folder exported alone: no results.json to compare it with.
ADAPTER_ONLY = ["method edited to inc_lora", "gates dropped from extra", "unknown method", "gates truncated"]
COMMANDS = {
    "eval": lambda source, tmp: ["eval", str(source)],  # would write RUN/eval.json
    "export": lambda source, tmp: ["export", str(source), "--to", str(tmp / "exported")],
    "predict": lambda source, tmp: ["predict", str(source), "Is this review positive? Answer:"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("case", "alone"), [(case, False) for case in CASES] + [(case, True) for case in ADAPTER_ONLY]
)
def test_damaged_folder_is_refused(case, alone, command, gainlora, tmp_path, capsys) -> None:
    """Old code: tracebacks (KeyError, JSONDecodeError, SafetensorError, FileNotFoundError...), or GainLoRA
    evaluated without its gates when the manifest's method was edited."""
    damage, message = CASES[case]
    run = copy_run(gainlora, tmp_path / "run")
    damage(run)
    source = run / "adapter" if alone else run
    assert message in refused(capsys, COMMANDS[command](source, tmp_path), tmp_path)


def test_undamaged_copy_is_accepted(gainlora, tmp_path) -> None:
    """The table's damages are what is refused: the same copy undamaged exports and loads."""
    run = copy_run(gainlora, tmp_path / "run")
    assert resolve_source(run).method == "gainlora"
    load_adapter(run / "adapter", tiny_random_llama()[0])


TARGETS = {  # target_modules written into adapter_config.json -> part of the error line
    "another existing module": (
        ["k_proj"],
        "q_proj.lora_A saved in adapter_model.safetensors was not loaded",
    ),
    "a nonexistent module": (["nope"], "PEFT cannot load this adapter: Target modules {'nope'} not found"),
    "no module": ([], "PEFT cannot load this adapter"),
    "one module more": (["q_proj", "v_proj", "k_proj"], "puts LoRA on model.layers.0.self_attn.k_proj"),
}


@pytest.mark.parametrize("case", list(TARGETS))
def test_edited_target_modules_are_refused(case, slao, tmp_path, capsys) -> None:
    """Old code: PEFT dropped the saved LoRA with a warning at most; eval scored the bare base model and
    export --merge wrote it."""
    modules, message = TARGETS[case]
    run = copy_run(slao, tmp_path / "run")
    edit_json("adapter/adapter_config.json", lambda c: c.update(target_modules=modules))(run)
    for argv in (
        ["eval", str(run)],
        ["predict", str(run), "Is this review positive? Answer:"],
        ["export", str(run), "--to", str(tmp_path / "merged"), "--merge"],
    ):
        err = refused(capsys, argv, tmp_path)
        assert str(run / "adapter") in err and message in err
    with pytest.raises(AdapterMismatchError, match="adapter"):
        load_adapter(run / "adapter", tiny_random_llama()[0])


def test_edited_target_modules_of_one_task_adapter_are_refused(gainlora, tmp_path, capsys) -> None:
    run = copy_run(gainlora, tmp_path / "run")
    edit_json("adapter/task2/adapter_config.json", lambda c: c.update(target_modules=["k_proj"]))(run)
    err = refused(capsys, ["eval", str(run)], tmp_path)
    assert "task2: model.layers.0.self_attn.q_proj.lora_A saved in adapter_model.safetensors" in err


# -- fuzz: random bytes or JSON as results.json and loracl_adapter.json -------------------------------------
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
NAMES = st.sampled_from(["task1", "task2", "task3", "..", "task1/x", "a\\b", "", "gates.safetensors"])
VALUES = SCALAR | NAMES | st.sampled_from(["gainlora", "inc_lora", "slao", "loracl-multi-lora", 1, 2])
JSON = st.recursive(
    VALUES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def mostly(valid: object, other: st.SearchStrategy) -> st.SearchStrategy:
    """Three times in four `valid` (a value, or a strategy), else a value of `other`: most examples get past
    the first checks and reach the later ones."""
    good = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    return st.integers(0, 3).flatmap(lambda i: good if i else other)


def some_dropped(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """A dictionary of `fields`, some keys left out."""
    dropped = st.sets(st.sampled_from(list(fields)), max_size=2)
    return st.tuples(st.fixed_dictionaries(fields), dropped).map(
        lambda pair: {k: v for k, v in pair[0].items() if k not in pair[1]}
    )


GOOD_EXTRA = {"gates": "gates.safetensors", "gate_dim": 64, "gate_hidden": 100, "gate_count": 2}
EXTRA = some_dropped({key: mostly(value, VALUES) for key, value in GOOD_EXTRA.items()})
MANIFESTS = some_dropped(
    {
        "format": mostly("loracl-multi-lora", VALUES),
        "version": mostly(1, VALUES),
        "method": mostly("gainlora", st.sampled_from(["inc_lora", "olora", "slao", "nope"]) | VALUES),
        "adapters": mostly(["task1", "task2"], st.lists(NAMES, max_size=3) | JSON),
        "extra": mostly(GOOD_EXTRA, EXTRA | JSON),
    }
)
RESULTS = some_dropped({"method": mostly("gainlora", VALUES), "base_dtype": mostly("float32", VALUES)})


def as_bytes(documents: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Mostly valid JSON of the given shape; else the same cut short, other JSON, or arbitrary bytes."""
    text = documents.map(json.dumps)
    cut_short = st.tuples(text, st.integers(0, 80)).map(lambda pair: pair[0][: pair[1]])
    damaged = st.one_of(cut_short, JSON.map(json.dumps)).map(str.encode) | st.binary(max_size=40)
    return mostly(text.map(str.encode), damaged)


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_run(gainlora, tmp_path_factory) -> Path:
    """One copy of the run, whose two JSON files each example rewrites (nothing else is ever written)."""
    return copy_run(gainlora, tmp_path_factory.mktemp("fuzz") / "run")


@pytest.fixture(scope="module")
def base_model():
    return tiny_random_llama()[0]


def only_loracl_errors(action: Callable[[], object]) -> None:
    try:
        action()
    except LoraclError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(results=as_bytes(RESULTS), manifest=as_bytes(MANIFESTS))
def test_readers_never_crash_on_a_run_folder(fuzz_run, base_model, results: bytes, manifest: bytes) -> None:
    (fuzz_run / "results.json").write_bytes(results)
    (fuzz_run / MANIFEST).write_bytes(manifest)
    only_loracl_errors(lambda: read_manifest(fuzz_run / "adapter"))
    only_loracl_errors(lambda: resolve_source(fuzz_run))
    only_loracl_errors(lambda: resolve_source(fuzz_run / "adapter"))  # an adapter folder alone
    # PEFT wraps the model it is given in place: each load gets its own copy of the tiny model.
    only_loracl_errors(lambda: load_adapter(fuzz_run / "adapter", copy.deepcopy(base_model)))
