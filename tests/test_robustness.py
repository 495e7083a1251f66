"""Bad input, end to end: each fault a user can make gives one line of error and a non-zero exit from the
CLI (a traceback only with --debug), or, where the input is usable, a warning and a run that goes on.

Faults and where they are tested (crash, kill, stop and disk-full faults: tests/test_resume.py):
  malformed / truncated JSON ........... test_cli_bad_data[truncated json, deeply nested, huge number],
                                         test_loaders_never_crash_* (hypothesis fuzz of the three loaders)
  wrong types .......................... test_cli_bad_data[answer a number, labels not a list]
  empty task ........................... test_cli_bad_data[empty split]
  duplicate task name in an order ...... test_cli_duplicate_task
  answer not in labels.json ............ test_answer_outside_labels_warns_and_is_kept
  prompt longer than max_length ........ test_long_prompt_is_cut_on_the_left_never_the_answer
  config key typo ...................... test_cli_config_typo_suggests_the_key
  adapter of another model or rank ..... test_adapter_of_another_model_or_rank_is_refused
  --debug shows the traceback .......... test_debug_shows_the_traceback
  hostile files and values (pipes, /dev/zero, lone surrogates, YAML alias bombs, 50 MB prompts, seeds and
  inf/nan that crash mid-run) ........... tests/test_hostile_input.py
"""

from __future__ import annotations

import json
import string
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from loracl.cli import main
from loracl.config import LoraSection
from loracl.data import Example, load_benchmark, load_cl_benchmark_task, load_jsonl_task, load_superni_task
from loracl.data.text import PromptEncoder
from loracl.errors import AdapterMismatchError, ConfigError, DataError
from loracl.files import first_lone_surrogate
from loracl.models.base_model import byte_tokenizer, tiny_random_llama
from loracl.models.lora import attach_lora, save_adapter
from loracl.outputs.loading import load_adapter

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LABELS = ["yes", "no"]
GOOD = [{"prompt": f"question {i}\nAnswer:", "answer": LABELS[i % 2]} for i in range(4)]


def write_task(root: Path, name: str, **files: object) -> Path:
    """A cl_benchmark task folder; `files` replaces a file's JSON content (str: raw text)."""
    task = root / name
    task.mkdir(parents=True, exist_ok=True)
    content = {"train.json": GOOD, "test.json": GOOD, "labels.json": LABELS}
    content.update({k.replace("_", "."): v for k, v in files.items()})
    for file, data in content.items():
        (task / file).write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return task


def cli_run(data_dir: Path, out: Path, *sets: str) -> list[str]:
    args = ["run", str(TINY), "--set", f"benchmark.data_dir={data_dir}", "--output", str(out)]
    for item in ("benchmark.tasks=[alpha]", *sets):
        args += ["--set", item]
    return args


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


BAD_DATA = {
    "truncated json": ({"train_json": '[{"prompt": "p", "ans'}, "invalid JSON at column"),
    "answer a number": ({"train_json": [{"prompt": "p", "answer": 3}]}, "field 'answer'"),
    "labels not a list": ({"labels_json": {"yes": 1}}, "non-empty JSON list of strings"),
    "empty split": ({"train_json": []}, "no examples"),
    "deeply nested": ({"test_json": "[" * 100_000}, "nested too deeply"),
    "huge number": ({"train_json": '[{"prompt": "p", "answer": ' + "9" * 5000 + "}]"}, "invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_cli_bad_data(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files, expected = BAD_DATA[case]
    write_task(tmp_path / "data", "alpha", **files)
    assert main(cli_run(tmp_path / "data", tmp_path / "out")) == 2
    err = one_line_error(capsys)
    assert expected in err and "alpha" in err  # names the file
    assert not (tmp_path / "out").exists()  # bad input leaves no half-written run


def test_cli_duplicate_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_task(tmp_path / "data", "alpha")
    assert main(cli_run(tmp_path / "data", tmp_path / "out", "benchmark.tasks=[alpha,ALPHA]")) == 2
    assert "same task twice" in one_line_error(capsys)


def test_cli_config_typo_suggests_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(TINY), "--set", "train.lerning_rate=1"]) == 2
    assert "unknown key 'train.lerning_rate'" in one_line_error(capsys)
    assert main(["run", str(TINY), "--set", "eval.batchsize=4"]) == 2
    assert "did you mean 'eval.batch_size'?" in one_line_error(capsys)
    assert main(["run", str(TINY), "--set", "method.schedul=inv"]) == 2
    assert "did you mean 'method.schedule'?" in one_line_error(capsys)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    write_task(tmp_path / "data", "alpha", train_json=[])
    with pytest.raises(DataError, match="no examples"):
        main(["--debug", *cli_run(tmp_path / "data", tmp_path / "out")])


def test_answer_outside_labels_warns_and_is_kept(tmp_path: Path) -> None:
    odd = [*GOOD, {"prompt": "q\nAnswer:", "answer": "maybe"}]
    write_task(tmp_path, "alpha", train_json=odd)
    with pytest.warns(UserWarning, match="1 of 5 examples have an answer not in labels.json"):
        (task,) = load_benchmark("cl_benchmark", data_dir=tmp_path, tasks=["alpha"])
    assert [ex.answers[0] for ex in task.train].count("maybe") == 1


def test_long_prompt_loses_the_middle_of_its_longest_line_never_the_answer() -> None:
    encoder = PromptEncoder(byte_tokenizer(), max_length=48)
    prompt = "Pick one.\n" + "passage words " * 20 + "the end\nquestion?\nAnswer:"
    encoded = encoder.encode(Example(prompt, ("positive",)))
    answer = encoder.answer_ids("positive")
    assert encoded.truncated and len(encoded.input_ids) <= 48
    assert encoded.input_ids[encoded.prompt_len :] == answer  # the whole answer, eos included
    kept = encoder.tokenizer.decode(encoded.input_ids[: encoded.prompt_len])
    assert kept.startswith("Pick one.\np") and kept.endswith("end\nquestion?\nAnswer:")
    assert " ... " in kept  # where the middle of the passage was
    short = encoder.encode(Example("q\nAnswer:", ("positive",)))
    assert not short.truncated  # counted per task as train.truncated_prompts (see test_resume's reference)


@pytest.fixture(scope="module")
def exported_adapter(tmp_path_factory) -> Path:
    model, _ = tiny_random_llama()
    peft = attach_lora(model, LoraSection(r=4, alpha=8))
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(peft, directory)
    return directory


def test_adapter_of_another_model_or_rank_is_refused(exported_adapter: Path) -> None:
    model, _ = tiny_random_llama()
    assert load_adapter(exported_adapter, model, rank=4).peft_config["default"].r == 4
    with pytest.raises(AdapterMismatchError, match="adapter of rank 4, expected rank 8"):
        load_adapter(exported_adapter, tiny_random_llama()[0], rank=8)
    wider = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(AdapterMismatchError, match=r"q_proj.lora_A is \[4, 64\] but .* needs \[4, 32\]"):
        load_adapter(exported_adapter, wider)
    shallow = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(AdapterMismatchError, match=r"has no layer model\.layers\.1\.self_attn"):
        load_adapter(exported_adapter, shallow)
    with pytest.raises(AdapterMismatchError, match="not a readable PEFT adapter"):
        load_adapter(exported_adapter.parent, tiny_random_llama()[0])
    for error in (AdapterMismatchError, DataError, ConfigError):
        assert issubclass(error, Exception) and error.exit_code == 2


# --- fuzz: any file content either loads or raises DataError ----------------------------------------------

KEYS = st.sampled_from(["prompt", "answer", "input", "output", "Definition", "Instances", "id", "label"])
# st.text() never draws surrogates (they cannot be encoded), yet JSON's "\ud800" escape decodes to one: draw
# them on purpose, json.dumps below writes them as such escapes.
CHARS = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())


def any_text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(CHARS, min_size=min_size, max_size=max_size)


SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | any_text(8)


def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(KEYS | any_text(4), inner, max_size=4)


JSON = st.recursive(SCALAR, containers, max_leaves=12)
TEXTS = st.lists(any_text(3), max_size=3)
SHORT = any_text(6)
RECORD = st.fixed_dictionaries({"prompt": SHORT | JSON, "answer": SHORT | TEXTS | JSON})
INSTANCE = st.fixed_dictionaries({"input": any_text(5) | JSON, "output": TEXTS | JSON})


def serialized(records: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Valid JSON of the given shape, the same text cut short, or arbitrary bytes."""
    text = records.map(lambda data: json.dumps(data))
    cut = st.tuples(text, st.integers(0, 200)).map(lambda pair: pair[0][: pair[1]])
    noise = st.text(alphabet=string.printable + "é\u2028\ufeff", max_size=40)
    return st.one_of(text, cut, noise).map(str.encode) | st.binary(max_size=40)




def json_bytes(data: object) -> bytes:
    return json.dumps(data).encode()


SPLIT = serialized(st.lists(RECORD, max_size=3) | JSON)
LINES = st.lists(serialized(RECORD | JSON), max_size=4).map(b"\n".join)
LABEL_FILE = serialized(st.lists(any_text(4), max_size=3) | JSON)
SUPERNI_TASK = st.fixed_dictionaries(
    {"Definition": TEXTS | JSON, "Instances": st.lists(INSTANCE, max_size=4) | JSON}
)

# Whole tasks of well-formed files whose texts are anything: without them a load almost never succeeds, and
# a text that passes through into a task (a lone surrogate, say) would go unchecked.
SOME_TEXT = any_text(6, min_size=1)
SOME_TEXTS = st.lists(SOME_TEXT, min_size=1, max_size=3)
TEXT_RECORD = st.fixed_dictionaries({"prompt": SOME_TEXT, "answer": SOME_TEXT})
TEXT_RECORDS = st.lists(TEXT_RECORD, min_size=1, max_size=3)
TEXT_SPLIT = TEXT_RECORDS.map(json_bytes)
TEXT_LINES = TEXT_RECORDS.map(lambda records: b"\n".join(map(json_bytes, records)))
TEXT_LABEL_FILE = SOME_TEXTS.map(json_bytes)
TEXT_INSTANCE = st.fixed_dictionaries({"input": SOME_TEXT, "output": SOME_TEXTS})
TEXT_SUPERNI = st.fixed_dictionaries(
    {"Definition": SOME_TEXT, "Instances": st.lists(TEXT_INSTANCE, min_size=2, max_size=4)}
)

CL_TASK = st.tuples(SPLIT, SPLIT, LABEL_FILE) | st.tuples(TEXT_SPLIT, TEXT_SPLIT, TEXT_LABEL_FILE)
JSONL_TASK = st.tuples(LINES, LINES) | st.tuples(TEXT_LINES, TEXT_LINES)
SUPERNI = serialized(SUPERNI_TASK | JSON) | TEXT_SUPERNI.map(json_bytes)


def loads_or_data_error(load) -> None:
    """`load()` raises a one-line DataError, or returns a task whose every text is valid Unicode (a lone
    surrogate passed on would crash the tokenizer or a UTF-8 writer later in the run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # answers outside labels.json: warned, kept
        try:
            task = load()
        except DataError as exc:
            assert "\n" not in str(exc)
            return
    examples = task.train + task.test + task.validation
    texts = [*(task.labels or []), *(text for ex in examples for text in (ex.prompt, *ex.answers))]
    assert all(first_lone_surrogate(t) is None for t in texts)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(files=CL_TASK)
def test_loaders_never_crash_cl_benchmark(files: tuple[bytes, bytes, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "task"
        task.mkdir()
        for name, data in zip(("train.json", "test.json", "labels.json"), files, strict=True):
            (task / name).write_bytes(data)
        loads_or_data_error(lambda: load_cl_benchmark_task(task))


@FUZZ
@given(files=JSONL_TASK)
def test_loaders_never_crash_jsonl(files: tuple[bytes, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "task"
        task.mkdir()
        for name, data in zip(("train.jsonl", "test.jsonl"), files, strict=True):
            (task / name).write_bytes(data)
        loads_or_data_error(lambda: load_jsonl_task(task))


@FUZZ
@given(content=SUPERNI, test_size=st.integers(-1, 5))
def test_loaders_never_crash_superni(content: bytes, test_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task001_fuzz.json"
        path.write_bytes(content)
        loads_or_data_error(lambda: load_superni_task(path, test_size=test_size))
