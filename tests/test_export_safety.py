"""`loracl export / eval / predict` never destroy a user's file and never die with a traceback (issue 15).

Each refusal: exit status 2, one `error: ...` line, and no file changed in the run folder nor beside the
target (tree digests before and after).

  --to the run, inside it, above it, a link to it ....... test_export_refuses_a_target_overlapping_the_source
  --overwrite of a folder or file export did not write .. test_overwrite_replaces_only_an_earlier_export
  an earlier export replaced, marker with hashes ......... test_overwrite_replaces_an_earlier_export
  truncated / empty weights copied unread ................ test_export_refuses_weights_that_do_not_read
  a copy that differs from its source .................... test_export_verifies_the_written_copy
  a merged model saved torn; the old export kept ......... test_failed_merge_keeps_the_earlier_export
  predict: --file not UTF-8, a pipe, too large; bad
    prompts; --max-new-tokens 0 / -1 ..................... test_predict_refuses_bad_input
  eval -o a folder or a foreign file, --max-test 0 ....... test_eval_refuses_bad_options
  --tasks / --data-dir values never parsed as YAML ....... test_eval_options_are_strings_not_yaml,
                                                           test_eval_data_dir_with_a_colon
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safety import one_line, tree_digest
from transformers import PreTrainedModel

from loracl.cli import build_parser, main
from loracl.data.paths import default_data_root
from loracl.files import MAX_FILE_BYTES_ENV
from loracl.outputs import deploy, export
from loracl.outputs.deploy import resolve_source
from loracl.outputs.export import EXPORT_MARKER

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_run(tmp_path_factory: pytest.TempPathFactory, method: str) -> Path:
    """A finished tiny run of `method` on two tasks (about a second of training)."""
    out = tmp_path_factory.mktemp(method) / "run"
    sets = [f"method.name={method}", "benchmark.tasks=[dbpedia,amazon]", "eval.zero_shot=false"]
    assert main(["run", str(TINY), *(a for s in sets for a in ("--set", s)), "--output", str(out)]) == 0
    return out


def copy_run(run: Path, where: Path) -> Path:
    """A private copy of a shared run, for a test that may (on faulty code) damage it."""
    return Path(shutil.copytree(run, where))


def refused(capsys: pytest.CaptureFixture, argv: list[str], *watched: Path) -> str:
    """Run the CLI: exit status 2, one error line (returned), and nothing under `watched` changed."""
    before = [tree_digest(path) for path in watched]
    assert main(argv) == 2
    line = one_line(capsys)
    assert [tree_digest(path) for path in watched] == before
    return line


@pytest.fixture(scope="module")
def slao(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory, "slao")


# -- export: the target ------------------------------------------------------------------------------------
OVERLAPS = {  # name -> (source relative to home, --to relative to home, --overwrite, the error's word)
    "the run itself": ("runs/run", "runs/run", True, "is the source"),
    "the run's adapter": ("runs/run", "runs/run/adapter", True, "lies inside"),
    "the adapter, no --overwrite": ("runs/run", "runs/run/adapter", False, "lies inside"),
    "a new folder inside the run": ("runs/run", "runs/run/exported", False, "lies inside"),
    "the folder above the run": ("runs/run", "runs", True, "contains"),
    "the home above that": ("runs/run", ".", True, "contains"),
    "a link to the run": ("runs/run", "link", True, "is the source"),
    "inside an exported adapter": ("runs/run/adapter", "runs/run/adapter/sub", False, "lies inside"),
    "the run of an exported adapter": ("runs/run/adapter", "runs/run", True, "contains"),
}


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_export_refuses_a_target_overlapping_the_source(case, slao, tmp_path, capsys) -> None:
    """Old code: --to RUN --overwrite deleted the run, --to RUN/adapter its final adapter, --to above it the
    whole tree."""
    source, to, overwrite, word = OVERLAPS[case]
    home = tmp_path / "home"
    copy_run(slao, home / "runs" / "run")
    (home / "link").symlink_to(home / "runs" / "run")
    argv = ["export", str(home / source), "--to", str(home / to), *(["--overwrite"] if overwrite else [])]
    assert word in refused(capsys, argv, home)


def test_overwrite_replaces_only_an_earlier_export(slao, tmp_path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    argv = ["export", str(slao), "--to", str(mine), "--overwrite"]
    assert "not a loracl export" in refused(capsys, argv, tmp_path)
    (tmp_path / "file").write_text("keep me too")
    for extra in ([], ["--overwrite"]):
        err = refused(capsys, ["export", str(slao), "--to", str(tmp_path / "file"), *extra], tmp_path)
        assert "not a folder" in err
    exported = tmp_path / "exported"
    assert main(["export", str(slao), "--to", str(exported)]) == 0
    (exported / "mine.txt").write_text("a file of the user's, put in the export folder")
    err = refused(capsys, ["export", str(slao), "--to", str(exported), "--overwrite"], tmp_path, slao)
    assert "mine.txt was not written by loracl export" in err


def test_overwrite_replaces_an_earlier_export(slao, tmp_path) -> None:
    target = tmp_path / "exported"
    assert main(["export", str(slao), "--to", str(target)]) == 0
    assert main(["export", str(slao), "--to", str(target), "--merge", "--overwrite"]) == 0
    marker = json.loads((target / EXPORT_MARKER).read_text())
    assert marker["format"] == "loracl-export" and marker["kind"] == "merged" and marker["method"] == "slao"
    assert marker["source"] == str(slao.resolve())
    written = {p.relative_to(target).as_posix(): tree_digest(p)[p.name] for p in target.rglob("*")}
    assert marker["files"] == {name: digest for name, digest in written.items() if name != EXPORT_MARKER}
    assert "model.safetensors" in marker["files"] and "adapter_model.safetensors" not in written
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary sibling left


# -- export: what is written -------------------------------------------------------------------------------
DAMAGED_WEIGHTS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "header only": lambda data: data[: 8 + int.from_bytes(data[:8], "little")],
}


@pytest.mark.parametrize("damage", list(DAMAGED_WEIGHTS))
@pytest.mark.parametrize("merge", [False, True], ids=["plain", "merge"])
def test_export_refuses_weights_that_do_not_read(damage, merge, slao, tmp_path, capsys) -> None:
    """Old code: the plain export copied the torn file without reading it, and said it had exported."""
    run = copy_run(slao, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(DAMAGED_WEIGHTS[damage](weights.read_bytes()))
    target = tmp_path / "new" / "exported"  # its parent is created for the export, and removed again
    argv = ["export", str(run), "--to", str(target), *(["--merge"] if merge else [])]
    assert "adapter_model.safetensors: not a readable safetensors file" in refused(capsys, argv, tmp_path)


def test_export_verifies_the_written_copy(slao, tmp_path, capsys, monkeypatch) -> None:
    """A copy that does not read back as its source (a disk error) is refused and nothing is left."""
    original = export.write_durable

    def corrupting(path: Path, write) -> None:
        original(path, lambda handle: (write(handle), handle.write(b"!")))

    monkeypatch.setattr(export, "write_durable", corrupting)
    err = refused(capsys, ["export", str(slao), "--to", str(tmp_path / "exported")], tmp_path, slao)
    assert "its copy does not read back equal" in err


def test_failed_merge_keeps_the_earlier_export(slao, tmp_path, capsys, monkeypatch) -> None:
    """The merged weights are read back before the old export is replaced: a torn save changes nothing."""
    target = tmp_path / "exported"
    assert main(["export", str(slao), "--to", str(target)]) == 0
    save = PreTrainedModel.save_pretrained

    def torn_save(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)
        weights = Path(directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", torn_save)
    argv = ["export", str(slao), "--to", str(target), "--merge", "--overwrite"]
    assert "model.safetensors: the written weights do not read back" in refused(capsys, argv, tmp_path, slao)


# -- predict and eval: options and input files -----------------------------------------------------------
def test_predict_refuses_bad_input(slao, tmp_path, capsys, monkeypatch) -> None:
    files = {"latin1.jsonl": '"caf\xe9"\n'.encode("latin-1"), "lone.jsonl": b'{"prompt": "\\ud800"}\n'}
    files |= {"blank.jsonl": b'"ok"\n{"prompt": "  "}\n', "big.jsonl": b'"a prompt"\n' * 10}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "pipe")  # reading it would block for ever
    cases = {
        "latin1.jsonl": "not UTF-8 text",
        "pipe": "not a regular file",
        "lone.jsonl": "lone.jsonl:1: not valid Unicode text",
        "blank.jsonl": "blank.jsonl:2: empty prompt",
    }
    for name, message in cases.items():
        argv = ["predict", str(slao), "--file", str(tmp_path / name)]
        assert message in refused(capsys, argv, tmp_path, slao)
    with monkeypatch.context() as patch:
        patch.setenv(MAX_FILE_BYTES_ENV, str(len(files["big.jsonl"]) - 1))
        big = refused(capsys, ["predict", str(slao), "--file", str(tmp_path / "big.jsonl")], tmp_path, slao)
        assert f"more than the {len(files['big.jsonl']) - 1} loracl reads" in big
    for prompt, message in (("", "empty prompt"), ("  \n", "empty prompt"), ("a\ud800", "lone surrogate")):
        assert message in refused(capsys, ["predict", str(slao), prompt], tmp_path, slao)
    for cap in ("0", "-1"):
        err = refused(capsys, ["predict", str(slao), "hello", "--max-new-tokens", cap], tmp_path, slao)
        assert "--max-new-tokens: must be a positive number" in err


def test_eval_refuses_bad_options(slao, tmp_path, capsys, monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(deploy, "load_final_model", never)
    folder = tmp_path / "results"
    folder.mkdir()
    (tmp_path / "notes.json").write_text('{"mine": true}')
    cases = {
        ("-o", str(folder)): "is a folder",
        ("-o", str(tmp_path / "notes.json")): "not an earlier eval result",
        ("--max-test", "0"): "--max-test: must be a positive number",
        ("--max-test", "-1"): "--max-test: must be a positive number",
        ("--tasks", "dbpedia,,amazon"): "--tasks: an empty task name",
    }
    for options, message in cases.items():
        assert message in refused(capsys, ["eval", str(slao), *options], tmp_path, slao)
    assert not list(tmp_path.rglob("*.tmp"))


def test_eval_options_are_strings_not_yaml(slao) -> None:
    """`--tasks no` was the boolean false, `--order 1e3` a number: values reach the config as written."""
    from loracl.cli import _eval_overrides

    args = build_parser().parse_args(["eval", str(slao), "--tasks", "no, on,null", "--data-dir", "a: b #c"])
    config = resolve_source(slao, _eval_overrides(args)).config
    assert config.benchmark.tasks == ["no", "on", "null"] and config.benchmark.data_dir == "a: b #c"
    args = build_parser().parse_args(["eval", str(slao), "--order", "1e3", "--benchmark", "[x]"])
    config = resolve_source(slao, _eval_overrides(args), model="yes").config
    assert (config.benchmark.order, config.benchmark.name, config.model.name) == ("1e3", "[x]", "yes")


def test_eval_data_dir_with_a_colon(slao, tmp_path) -> None:
    data = tmp_path / "my: data"  # refused as invalid YAML by the old code
    data.mkdir()
    (data / "dbpedia").symlink_to(default_data_root() / "cl_benchmark" / "dbpedia")
    output = tmp_path / "eval.json"
    argv = ["eval", str(slao), "--tasks", "dbpedia", "--max-test", "2", "--data-dir", str(data)]
    argv += ["-o", str(output)]
    assert main(argv) == 0
    assert json.loads(output.read_text())["test_examples"] == [2]
    assert main(argv) == 0  # an earlier eval result is replaced
