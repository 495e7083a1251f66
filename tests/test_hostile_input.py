"""Hostile input: data files and config values built (or found) to hang loracl, exhaust its memory or crash a
run half-way are refused up front: exit status 2, one line of error naming the file or key, nothing written.

  lone surrogate in a data text ....... test_lone_surrogate_in_data_is_refused[prompt, answer, answer item,
                                        label, olora sentence, superni definition, superni input]
  data file a pipe, /dev/zero, ... .... test_data_file_that_is_not_a_regular_file_is_refused[...],
                                        test_data_file_over_the_size_bound_is_refused
  task file name not UTF-8 ............ test_task_file_name_not_utf8_is_refused (and other folder faults:
                                        test_dangling_labels_link_and_vanished_folders_are_data_errors)
  50 MB one-line prompt or answer ..... test_huge_texts_are_cut_by_characters_before_tokenising,
                                        test_char_cut_keeps_the_token_ids_of_today[...]
  YAML billion laughs, deep nesting ... test_yaml_that_would_hang_is_refused[...],
                                        test_config_file_bomb_is_refused
  config a pipe, /dev/zero, too big ... test_config_file_that_is_not_a_small_regular_file_is_refused[...]
  values that crash mid-run ........... test_values_that_would_crash_mid_run_are_refused[...] (seed, inf/nan,
                                        target_modules, lone surrogate in output_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safety import one_line, tree_digest
from test_data import make_cl_task, make_jsonl_task, make_olora_task, superni_data, write_json, write_jsonl

from loracl.cli import main
from loracl.config import MAX_CONFIG_BYTES, MAX_YAML_VALUES, build_config
from loracl.data import Example, load_jsonl_task
from loracl.data.paths import subdirs
from loracl.data.text import CHARS_PER_TOKEN, PromptEncoder
from loracl.errors import ConfigError, DataError
from loracl.files import MAX_FILE_BYTES_ENV
from loracl.models.base_model import byte_tokenizer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SURROGATE = "\ud800"  # what JSON's or YAML's "\ud800" escape decodes to: not valid Unicode text


def run_args(data: Path, *sets: str, benchmark: str = "cl_benchmark", task: str = "alpha") -> list[str]:
    """`loracl run` of the tiny config on the one task `task` of `data` (the caller adds --output)."""
    args = [str(TINY)]
    for item in (
        f"benchmark.name={benchmark}",
        f"benchmark.data_dir={data}",
        f"benchmark.tasks=[{task}]",
        *sets,
    ):
        args += ["--set", item]
    return args


def refused(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> str:
    """Run `loracl run ARGS` to a new folder, then with --overwrite onto an earlier run: both are refused with
    exit status 2 and the same single line, the new folder is not created and nothing under tmp_path (data,
    config, the earlier run) changes. Returns the line."""
    new, earlier = tmp_path / "new-run", tmp_path / "earlier-run"
    earlier.mkdir(exist_ok=True)
    # What --overwrite accepts as a loracl run (and would empty, were the input let through).
    (earlier / "results.json").write_text('{"loracl_version": "0", "matrix": []}', encoding="utf-8")
    before = tree_digest(tmp_path)
    assert main(["run", *args, "--output", str(new)]) == 2
    message = one_line(capsys)
    assert not new.exists() and not new.is_symlink()
    assert main(["run", *args, "--output", str(earlier), "--overwrite"]) == 2
    assert one_line(capsys) == message
    assert tree_digest(tmp_path) == before
    return message


# --- data files ---------------------------------------------------------------------------------------------


def _cl_record(split: str, index: int, field: str, value: object) -> Callable[[Path], tuple[str, str]]:
    def make(root: Path) -> tuple[str, str]:
        task = make_cl_task(root, "alpha", n_train=6, n_test=4)
        records = json.loads((task / f"{split}.json").read_text(encoding="utf-8"))
        records[index][field] = value
        write_json(task / f"{split}.json", records)  # json.dumps writes the "\ud800" escape
        return "cl_benchmark", "alpha"

    return make


def _labels(root: Path) -> tuple[str, str]:
    write_json(make_cl_task(root, "alpha") / "labels.json", ["yes", f"n{SURROGATE}o"])
    return "cl_benchmark", "alpha"


def _jsonl_answer_item(root: Path) -> tuple[str, str]:
    task = make_jsonl_task(root, "alpha", labels=False)
    write_jsonl(
        task / "train.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "p", "answer": ["a", SURROGATE]}]
    )
    return "jsonl", "alpha"


def _olora_sentence(root: Path) -> tuple[str, str]:
    task = make_olora_task(root, "SC", "alpha")
    write_json(task / "test.json", [{"sentence": f"good {SURROGATE}", "label": "yes"}])
    return "olora", "alpha"


def _superni(definition: str, text: str) -> Callable[[Path], tuple[str, str]]:
    def make(root: Path) -> tuple[str, str]:
        data = superni_data([["yes"], ["no"], ["yes"], ["no"]])
        data["Definition"] = [definition]
        data["Instances"][2]["input"] = text
        write_json(root / "task001_alpha.json", data)
        return "superni", "task001_alpha"

    return make


SURROGATE_DATA = {
    "prompt": (_cl_record("train", 3, "prompt", f"x {SURROGATE} y"), "train.json: example 3: field 'prompt'"),
    "answer": (_cl_record("test", 0, "answer", f"ye{SURROGATE}s"), "test.json: example 0: field 'answer'"),
    "answer item": (_jsonl_answer_item, "train.jsonl: line 2: field 'answer' item 1"),
    "label": (_labels, "labels.json: label 1"),
    "olora sentence": (_olora_sentence, "test.json: example 0: field 'sentence'"),
    "superni definition": (_superni(f"Do {SURROGATE}.", "fine"), "task001_alpha.json: 'Definition'"),
    "superni input": (
        _superni("Do it.", f"in{SURROGATE}put"),
        "task001_alpha.json: instance 2: field 'input'",
    ),
}


@pytest.mark.parametrize("case", list(SURROGATE_DATA))
def test_lone_surrogate_in_data_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make, where = SURROGATE_DATA[case]
    benchmark, task = make(tmp_path / "data")
    message = refused(run_args(tmp_path / "data", benchmark=benchmark, task=task), tmp_path, capsys)
    assert f"{where} holds a lone surrogate (not valid Unicode text)" in message
    assert str(tmp_path / "data") in message  # the full path of the file


@pytest.fixture
def unblock_fifos(tmp_path: Path) -> Iterator[None]:
    """Should a regression open a named pipe for reading, a writer comes every few seconds (after the first
    10) and closes it at once: the test then fails on its message instead of hanging the suite."""
    done = threading.Event()

    def unblock() -> None:
        while not done.wait(10):
            for fifo in (path for path in tmp_path.rglob("*.json") if path.is_fifo()):
                with contextlib.suppress(OSError):  # no reader: nothing is blocked
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    yield
    done.set()
    thread.join()


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


SPECIAL = "not a regular file (a pipe, device or socket)"
NOT_REGULAR = {
    "train.json a named pipe": ("train.json", _fifo, SPECIAL),
    "labels.json a link to /dev/zero": ("labels.json", _dev_zero, SPECIAL),
    "test.json a folder": ("test.json", _folder, "a folder"),
}


@pytest.mark.usefixtures("unblock_fifos")
@pytest.mark.parametrize("case", list(NOT_REGULAR))
def test_data_file_that_is_not_a_regular_file_is_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    name, replace, expected = NOT_REGULAR[case]
    task = make_cl_task(tmp_path / "data", "alpha")
    replace(task / name)
    message = refused(run_args(tmp_path / "data"), tmp_path, capsys)
    assert message == f"error: {task / name}: {expected}; expected a regular file"


def test_data_file_over_the_size_bound_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = make_cl_task(tmp_path / "data", "alpha", n_train=100)
    monkeypatch.setenv(MAX_FILE_BYTES_ENV, "1000")  # labels.json and test.json fit, train.json does not
    message = refused(run_args(tmp_path / "data"), tmp_path, capsys)
    assert message.startswith(f"error: {task / 'train.json'}: ")
    assert message.endswith(f"more than the 1000 loracl reads ({MAX_FILE_BYTES_ENV})")


def test_task_file_name_not_utf8_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    write_json(data / os.fsdecode(b"task001_caf\xe9.json"), superni_data([["yes"], ["no"]] * 2))
    args = run_args(data, "benchmark.tasks=null", "benchmark.order=null", benchmark="superni")  # every file
    message = refused(args, tmp_path, capsys)
    assert message == f"error: {data}/task001_caf\\xe9.json: the task name is not valid UTF-8 text; rename it"


def test_dangling_labels_link_and_vanished_folders_are_data_errors(tmp_path: Path) -> None:
    task = make_jsonl_task(tmp_path, "alpha", labels=False)
    (task / "labels.json").symlink_to(tmp_path / "gone.json")  # not silently a task without labels
    with pytest.raises(DataError, match=r"labels\.json: file not found"):
        load_jsonl_task(task)
    with pytest.raises(DataError, match="cannot list folder"):  # a folder replaced by a file since checked
        subdirs(task / "train.jsonl")


# --- prompts and answers far beyond max_length --------------------------------------------------------------


class TokenizerSpy:
    """The byte tokenizer, refusing to tokenise a text longer than `limit` characters."""

    def __init__(self, limit: int, chat_template: str | None = None) -> None:
        self.inner, self.limit = byte_tokenizer(), limit
        self.inner.chat_template = chat_template

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def __call__(self, text: str, **kwargs: object) -> object:
        assert len(text) <= self.limit, f"tokenised {len(text)} characters whole"
        return self.inner(text, **kwargs)


CHAT = (
    "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
    "{% if add_generation_prompt %}<bot>{% endif %}"
)


def test_huge_texts_are_cut_by_characters_before_tokenising() -> None:
    max_length = 64
    spy = TokenizerSpy(limit=CHARS_PER_TOKEN * max_length + len(CHAT))
    encoder = PromptEncoder(spy, max_length)  # type: ignore[arg-type]
    huge = "x" * 50_000_000
    encoded = encoder.encode(Example(huge + " the end\nAnswer:", ("positive",)))
    assert encoded.truncated and len(encoded.input_ids) == max_length
    assert encoded.input_ids[encoded.prompt_len :] == encoder.answer_ids("positive")  # never cut by choice
    kept = spy.inner.decode(encoded.input_ids[: encoded.prompt_len])
    assert kept.startswith("xxx") and kept.endswith(" the end\nAnswer:")  # the middle went
    long_answer = encoder.encode(Example("q\nAnswer:", ("head " + huge,)))
    assert len(long_answer.input_ids) == max_length  # the answer keeps its head, the prompt one token
    assert spy.inner.decode(long_answer.input_ids[long_answer.prompt_len :]).startswith(" head xxx")
    templated = PromptEncoder(TokenizerSpy(spy.limit, CHAT), max_length, chat_template=True)  # type: ignore[arg-type]
    encoded = templated.encode(Example(huge + " the end", ("positive",)))
    assert encoded.truncated and spy.inner.decode(encoded.input_ids[: encoded.prompt_len]).endswith(
        "end</user><bot>"
    )


@pytest.mark.parametrize("template", [None, CHAT], ids=["raw", "chat template"])
@pytest.mark.parametrize("max_length", [16, 64])
def test_prompts_that_fit_are_tokenised_whole(template: str | None, max_length: int) -> None:
    """The character bound and the cut touch nothing that fits: the ids are the whole text's."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    encoder = PromptEncoder(tokenizer, max_length, chat_template=template is not None)
    answer = "pos"
    room = max_length - len(encoder.answer_ids(answer))
    for prompt in ("q?\nAnswer:", "y" * (room - len(CHAT) if template else room)):
        whole = tokenizer(encoder.prompt_text(prompt), add_special_tokens=False)["input_ids"]
        if len(whole) > room:
            continue  # a template longer than the room: nothing fits whole
        encoded = encoder.encode(Example(prompt, (answer,)))
        assert (encoded.input_ids[: encoded.prompt_len], encoded.truncated) == (whole, False)


# --- config files and values --------------------------------------------------------------------------------


def bomb(levels: int, flow: bool = False) -> str:
    """A 'billion laughs': each level a list of nine aliases of the level below, 9**levels values in all."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(lines) + "}" if flow else "\n".join(f"  {line}" for line in lines)


# Six levels, not the nine of the report: the refusal is the same (9**6 = 531,441 values, five times the
# bound), and should the check ever regress, the test fails in a second instead of growing past 4 GB.
assert MAX_YAML_VALUES < 9**6
EXPANDS = f"the YAML expands to more than {MAX_YAML_VALUES} values (anchors/aliases?)"

HANGING_YAML = {
    "alias bomb in --set": (f"method.x={bomb(6, flow=True)}", f"--set method.x: {EXPANDS}"),
    "alias inside its own anchor": ("method.x=&a [*a]", f"--set method.x: {EXPANDS}"),
    "nested 10,000 deep": ("method.x=" + "[" * 10_000, "--set method.x: YAML nested too deeply"),
    "integer of 5,000 digits": (
        "train.seed=" + "9" * 5000,
        "--set train.seed: invalid YAML value: Exceeds the",
    ),
    "date that does not exist": (
        "method.x=!!timestamp 2024-13-01",
        "--set method.x: invalid YAML value: month",
    ),
}


@pytest.mark.parametrize("case", list(HANGING_YAML))
def test_yaml_that_would_hang_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    override, expected = HANGING_YAML[case]
    make_cl_task(tmp_path / "data", "alpha")
    assert f"error: {expected}" in refused(run_args(tmp_path / "data", override), tmp_path, capsys)


def test_config_file_bomb_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(
        f"model:\n  name: tiny-random-llama\nmethod:\n  name: slao\n{bomb(6)}\n", encoding="utf-8"
    )
    assert refused([str(config)], tmp_path, capsys) == f"error: {config}: {EXPANDS}"


@pytest.mark.usefixtures("unblock_fifos")
@pytest.mark.parametrize("case", ["named pipe", "link to /dev/zero", "too big"])
def test_config_file_that_is_not_a_small_regular_file_is_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "config.json"  # .json: the fixture unblocks it should a regression open it
    if case == "named pipe":
        os.mkfifo(config)
    elif case == "link to /dev/zero":
        config.symlink_to("/dev/zero")
    else:
        config.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1), encoding="utf-8")
    message = refused([str(config)], tmp_path, capsys)
    expected = (
        "bytes, more than the" if case == "too big" else "not a regular file (a pipe, device or socket)"
    )
    assert message.startswith(f"error: {config}: ") and expected in message


CRASHING_VALUES = {
    "seed below 0": ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    "seed of 2**32": (f"train.seed={2**32}", "train.seed: Input should be less than 4294967296"),
    "lr inf": ("train.lr=.inf", "train.lr: Input should be a finite number"),
    "lr nan": ("train.lr=.nan", "train.lr: Input should be a finite number"),
    "alpha inf": ("lora.alpha=.inf", "lora.alpha: Input should be a finite number"),
    "dropout nan": ("lora.dropout=.nan", "lora.dropout: Input should be a finite number"),
    "validation nan": (
        "benchmark.validation_fraction=.nan",
        "benchmark.validation_fraction: Input should be a finite",
    ),
    "epochs inf": ("train.epochs=.inf", "train.epochs: Input should be a finite number"),
    "max_grad_norm inf": ("train.max_grad_norm=.inf", "train.max_grad_norm: Input should be a finite number"),
    "method option nan": (
        "method.constant=[1.0, .nan]",
        "method: Value error, option 'constant' is not a finite",
    ),
    "no target modules": ("lora.target_modules=[]", "lora.target_modules: List should have at least 1 item"),
    "blank target module": (
        "lora.target_modules=[q_proj, ' ']",
        "lora.target_modules: Value error, module names",
    ),
    "target module twice": ("lora.target_modules=[q_proj, q_proj]", "module names must be distinct"),
    "epochs 1e300": ("train.epochs=1e300", "train.epochs: Input should be less than or equal to 10000"),
    "max_new_tokens 1e20": ("eval.max_new_tokens=100000000000000000000", "eval.max_new_tokens: Input"),
    "batch 1e12": ("train.batch_size=1000000000000", "train.batch_size: Input should be less than or equal"),
    "lone surrogate in output_dir": (
        'output_dir="run\\ud800"',
        "--set output_dir: the value holds a lone surrogate",
    ),
}


@pytest.mark.parametrize("case", list(CRASHING_VALUES))
def test_values_that_would_crash_mid_run_are_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    override, expected = CRASHING_VALUES[case]
    make_cl_task(tmp_path / "data", "alpha")
    assert expected in refused(run_args(tmp_path / "data", override), tmp_path, capsys)


def test_non_finite_values_are_refused_in_code_too() -> None:
    """Configs built in code (loracl bench's grid cells) meet the same checks as files."""
    with pytest.raises(ConfigError, match="train.lr: Input should be a finite number"):
        build_config({"train": {"lr": float("inf")}})
    with pytest.raises(ConfigError, match="option 'x' is not a finite number"):
        build_config({"method": {"name": "slao", "x": {"y": float("nan")}}})
