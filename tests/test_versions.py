"""Adapter versions and the forgetting guard (loracl.outputs.versions), on the tiny random Llama: every
finished task's adapter kept as versions/v<k>/ with its scores, `--keep-versions` pruning, `loracl versions`,
`loracl export --version`, `loracl promote`, and a guard that holds back a task built to collide with an
earlier one (the same prompts, the other answer, learnt at a high rate: sequential LoRA forgets the first
answer entirely), with exit status 3. Bad input is one line, exit status 2, and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safety import one_line, tree_digest

from loracl.cli import main
from loracl.config import build_config, load_config
from loracl.engine.metrics import all_metrics
from loracl.errors import HELD_BACK_EXIT
from loracl.locking import FolderLock
from loracl.recipes import run as runner
from loracl.recipes.checkpoint import config_hash
from loracl.recipes.run import result_relevant_config, resumed_config, run, write_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
WEIGHTS = "adapter_model.safetensors"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def items(answer: str, start: int, n: int) -> list[dict]:
    """The same prompts in every task (`item i`): tasks differ only in the answer, so they collide."""
    return [{"prompt": f"item {i}\nAnswer:", "answer": answer} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """alpha answers x; beta and gamma answer y to the same prompts."""
    root = tmp_path_factory.mktemp("data")
    for name, answer in (("alpha", "x"), ("beta", "y"), ("gamma", "y")):
        write_jsonl(root / name / "train.jsonl", items(answer, 0, 16))
        write_jsonl(root / name / "test.jsonl", items(answer, 100, 4))
        (root / name / "labels.json").write_text(json.dumps(["x", "y"]))
    return root


def settings(data: Path, tasks: list[str], *extra: str) -> list[str]:
    # sequential LoRA at a high rate: each task's answer overwrites the previous one (forgetting is total)
    return [
        "benchmark.name=jsonl", f"benchmark.data_dir={data}", f"benchmark.tasks=[{','.join(tasks)}]",
        "benchmark.max_train=null", "benchmark.max_test=null", "eval.zero_shot=false", "train.max_length=32",
        "method.name=seq_lora", "train.lr=3e-2", "train.epochs=8", *extra,
    ]  # fmt: skip


def run_args(data: Path, out: Path, tasks: list[str], *flags: str) -> list[str]:
    sets = [arg for item in settings(data, tasks) for arg in ("--set", item)]
    return ["run", str(TINY), *sets, "--output", str(out), *flags]


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def entries(run_dir: Path) -> dict[int, dict]:
    listed = read(run_dir / "versions.json")["versions"]
    found = {e["version"]: e for e in listed}
    assert len(found) == len(listed), "a version listed twice"
    return found


def history(run_dir: Path) -> list[tuple[int, str]]:
    return [(h["version"], h["by"]) for h in read(run_dir / "versions.json")["history"]]


@pytest.fixture(scope="module")
def collided(data: Path, tmp_path_factory) -> tuple[Path, int]:
    """alpha then beta with the guard at 10 points, through the CLI: (run directory, exit status)."""
    out = tmp_path_factory.mktemp("collided") / "run"
    return out, main(run_args(data, out, ["alpha", "beta"], "--max-forgetting", "10"))


def copy_run(collided: tuple[Path, int], where: Path) -> Path:
    return Path(shutil.copytree(collided[0], where))


def test_every_finished_task_keeps_a_version_with_its_scores(data: Path, tmp_path: Path) -> None:
    config = load_config(TINY, settings(data, ["alpha", "beta"]))
    results = run(config, tmp_path / "plain")
    out = tmp_path / "plain"
    matrix = results["matrix"]
    assert matrix[0][0] - matrix[1][0] == 100.0  # the collision: beta's answer wiped alpha's out
    kept = entries(out)
    assert sorted(kept) == [1, 2] and [kept[k]["task"] for k in (1, 2)] == ["alpha", "beta"]
    for k, entry in kept.items():
        assert entry["scores"] == matrix[k - 1]
        assert entry["metrics"] == all_metrics([row[:k] for row in matrix[:k]], None)
        assert entry["status"] == "promoted" and entry["held_back"] is False
        assert entry["config_hash"] == config_hash(result_relevant_config(config))
        folder = out / "versions" / f"v{k}"
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS]
        assert entry["bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    assert kept[1]["drop"] is None and kept[2]["drop"] == 100.0  # a[1][1] - a[2][1]
    listed = read(out / "versions.json")
    assert listed["promoted"] == 2 and history(out) == [(1, "run"), (2, "run")]
    assert results["promoted_version"] == 2 and results["held_back"] == []
    assert same_weights(out / "adapter", out / "versions" / "v2")  # no guard: adapter/ is the last version
    assert not same_weights(out / "versions" / "v1", out / "versions" / "v2")
    # version 1 is what a run that ended after alpha serves
    run(load_config(TINY, settings(data, ["alpha"])), tmp_path / "alpha-only")
    assert same_weights(out / "versions" / "v1", tmp_path / "alpha-only" / "adapter")
    report = (out / "report.md").read_text()
    assert "## Adapter versions" in report and "held back" not in report


def test_the_guard_holds_back_a_task_that_collides_with_an_earlier_one(collided: tuple[Path, int]) -> None:
    out, code = collided
    assert code == HELD_BACK_EXIT == 3
    results = read(out / "results.json")
    assert results["complete"] and len(results["matrix"]) == 2  # the sequence went on past the candidate
    assert results["promoted_version"] == 1 and results["held_back"] == [2]
    kept = entries(out)
    assert kept[2]["status"] == "candidate" and kept[2]["held_back"] is True
    assert kept[2]["drop"] == 100.0 and kept[2]["limit"] == 10.0 and kept[2]["measured_on"] == "test"
    assert read(out / "versions.json")["promoted"] == 1
    assert same_weights(out / "adapter", out / "versions" / "v1")
    assert not same_weights(out / "adapter", out / "versions" / "v2")
    report = (out / "report.md").read_text()
    assert "adapter/ serves version 1 (alpha), not the last" in report
    why = "version 2 (beta) held back: average drop 100.0 points on earlier tasks (test) > limit 10"
    assert why in report
    card = (out / "adapter" / "README.md").read_text()  # its table: the last version's scores; so a note
    assert "**This folder holds adapter version 1** (after step 1, alpha), not the last" in card
    assert "Its own scores, task by task: 100.0, 0.0." in card


def test_promote_serves_a_held_back_version(collided, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = copy_run(collided, tmp_path / "run")
    card = (out / "adapter" / "README.md").read_text()
    assert main(["promote", str(out), "--version", "2"]) == 0
    assert "adapter/ serves version 2 (beta)" in capsys.readouterr().out
    assert same_weights(out / "adapter", out / "versions" / "v2")
    # the run's model card (not PEFT's), less its note: adapter/ now holds the last version
    assert (out / "adapter" / "README.md").read_text() == card.split("\n<!-- loracl: adapter version -->")[0]
    listed = read(out / "versions.json")
    assert listed["promoted"] == 2 and entries(out)[2]["status"] == "promoted"
    assert history(out) == [(1, "run"), (2, "promote")]
    results = read(out / "results.json")
    assert results["promoted_version"] == 2 and results["held_back"] == []
    report = (out / "report.md").read_text()
    assert "adapter/ serves version 2 (beta)." in report and "held back:" not in report
    assert main(["run", "--resume", "--output", str(out)]) == 0  # complete, and the last version served
    assert not (out / ".loracl.lock").exists()


def test_export_a_version(collided, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = collided[0]
    assert main(["export", str(out), "--version", "2", "--to", str(tmp_path / "v2")]) == 0
    assert same_weights(tmp_path / "v2", out / "versions" / "v2")
    assert (tmp_path / "v2" / "loracl_export.json").is_file()
    capsys.readouterr()
    before = tree_digest(out)
    assert main(["export", str(out), "--version", "5", "--to", str(tmp_path / "v5")]) == 2
    assert "has no version 5 (its versions: 1, 2)" in one_line(capsys)
    assert not (tmp_path / "v5").exists() and tree_digest(out) == before


def test_versions_lists_every_version(collided, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = collided[0]
    assert main(["versions", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["version", "task", "time", "AP", "so", "far", "drop", "status"]
    first, second = lines[1].split(), lines[2].split()
    assert first[:2] == ["1", "alpha"] and first[3:] == ["100.0", "n/a", "promoted", "(served)"]
    assert second[:2] == ["2", "beta"] and second[3:] == ["50.0", "100.0", "candidate", "(held", "back)"]
    assert lines[-1].startswith("adapter/ serves version 1 (alpha), not the last: newer, not promoted: 2")
    bare = copy_run(collided, tmp_path / "old")
    (bare / "versions.json").unlink()  # a run made before versions existed
    assert main(["versions", str(bare)]) == 2
    assert "no adapter versions" in one_line(capsys)


def _unknown(run_dir: Path) -> None:
    pass


def _deleted(run_dir: Path) -> None:
    listed = read(run_dir / "versions.json")
    listed["versions"][1]["status"] = "deleted"
    (run_dir / "versions.json").write_text(json.dumps(listed))
    shutil.rmtree(run_dir / "versions" / "v2")


def _no_versions(run_dir: Path) -> None:
    (run_dir / "versions.json").unlink()


def _unfinished(run_dir: Path) -> None:
    results = read(run_dir / "results.json")
    results["complete"] = False
    (run_dir / "results.json").write_text(json.dumps(results))


@pytest.mark.parametrize(
    ("damage", "version", "message"),
    [
        (_unknown, "7", "has no version 7 (its versions: 1, 2)"),
        (_unknown, "-1", "has no version -1"),
        (_deleted, "2", "the folder of version 2 of"),
        (_no_versions, "2", "no adapter versions (no versions.json"),
        (_unfinished, "2", "the run is not finished"),
        (None, "2", "this run directory is in use by loracl process"),
    ],
    ids=["unknown", "negative", "deleted", "no-versions", "unfinished", "locked"],
)
def test_promote_refusals_change_nothing(
    damage, version: str, message: str, collided, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = copy_run(collided, tmp_path / "run")
    lock = FolderLock(out, "run directory")
    if damage is None:
        lock.acquire()  # a run (or another promote) holds the run directory
    else:
        damage(out)
    try:
        before = tree_digest(out)
        assert main(["promote", str(out), "--version", version]) == 2
        assert message in one_line(capsys)
        assert tree_digest(out) == before
    finally:
        lock.release()


def test_keep_versions_prunes_the_oldest_but_never_the_promoted(data: Path, tmp_path: Path) -> None:
    """alpha, beta, gamma (beta's answer again): versions 2 and 3 both forget alpha, so version 1 stays
    served; --keep-versions 1 keeps the newest (3) and the promoted (1). eval.matrix=metrics would skip
    a[2][1]: the guard makes every row evaluate every task learnt so far."""
    out = tmp_path / "run"
    args = run_args(data, out, ["alpha", "beta", "gamma"], "--max-forgetting", "10", "--keep-versions", "1")
    assert main([*args, "--set", "eval.matrix=metrics"]) == HELD_BACK_EXIT
    assert sorted(p.name for p in (out / "versions").iterdir()) == ["v1", "v3"]
    kept = entries(out)
    assert [kept[k]["status"] for k in (1, 2, 3)] == ["promoted", "deleted", "candidate"]
    assert kept[2]["held_back"] is True and kept[2]["scores"] == [0.0, 100.0, 100.0]  # its entry stays
    assert kept[3]["drop"] == 50.0  # ((100 - 0) + (100 - 100)) / 2
    matrix = read(out / "results.json")["matrix"]
    assert matrix[0][2] is None  # eval.matrix=metrics still leaves out what no metric or guard reads
    assert all(v is not None for row in matrix[1:] for v in row)
    assert read(out / "results.json")["held_back"] == [2, 3]
    assert same_weights(out / "adapter", out / "versions" / "v1")
    report = (out / "report.md").read_text()
    assert "version 2 (beta) held back" in report and "its folder was deleted (versions.keep)" in report


def test_a_guard_set_measures_the_drop(data: Path, tmp_path: Path) -> None:
    """A guard set on which alpha's examples take beta's answer: on it beta improves alpha, so version 2 is
    promoted although alpha's test score falls by 100 points."""
    guard = tmp_path / "guard"
    write_jsonl(guard / "alpha.jsonl", items("y", 200, 3))
    write_jsonl(guard / "beta.jsonl", items("y", 300, 2))
    out = tmp_path / "run"
    flags = ["--max-forgetting", "10", "--guard-set", str(guard)]
    assert main(run_args(data, out, ["alpha", "beta"], *flags)) == 0
    kept = entries(out)
    assert kept[1]["guard_scores"] == [0.0] and kept[2]["guard_scores"] == [100.0, 100.0]
    assert kept[2]["drop"] == -100.0 and kept[2]["measured_on"] == "guard_set"
    assert kept[2]["scores"][0] == 0.0 and kept[1]["scores"][0] == 100.0  # on test, alpha was forgotten
    assert kept[2]["status"] == "promoted" and read(out / "versions.json")["promoted"] == 2
    assert same_weights(out / "adapter", out / "versions" / "v2")


def _guard_without_beta(guard: Path) -> None:
    write_jsonl(guard / "alpha.jsonl", items("x", 0, 2))


def _guard_not_json(guard: Path) -> None:
    _guard_without_beta(guard)
    (guard / "beta.jsonl").write_text('{"prompt": "item 1\\nAnswer:", "answer": "y"}\n{\n')


def _guard_without_answer(guard: Path) -> None:
    _guard_without_beta(guard)
    write_jsonl(guard / "beta.jsonl", [{"prompt": "item 1\nAnswer:"}])


@pytest.mark.parametrize(
    ("flags", "make_guard", "message"),
    [
        (["--guard-set", "GUARD"], _guard_without_beta, "beta.jsonl is missing (one <task>.jsonl per task"),
        (["--guard-set", "GUARD"], _guard_not_json, "beta.jsonl: line 2: invalid JSON"),
        (["--guard-set", "GUARD"], _guard_without_answer, "beta.jsonl: line 1 has no 'answer' field"),
        (["--guard-set", "GUARD/absent"], _guard_without_beta, "absent is not a folder"),
        (["--max-forgetting", "-1"], None, "versions.max_forgetting: Input should be greater than or equal"),
        (["--max-forgetting", "nan"], None, "versions.max_forgetting: Input should be a finite number"),
        (["--keep-versions", "0"], None, "versions.keep: Input should be greater than or equal to 1"),
    ],
    ids=["guard-no-task", "guard-not-json", "guard-no-answer", "guard-no-dir", "x<0", "x-nan", "keep-0"],
)
def test_bad_versions_input_is_one_line_and_writes_nothing(
    flags: list[str], make_guard, message: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    guard = tmp_path / "guard"
    if make_guard is not None:
        make_guard(guard)
    out = tmp_path / "run"
    flags = [flag.replace("GUARD", str(guard)) for flag in flags]
    assert main(run_args(data, out, ["alpha", "beta"], *flags)) == 2
    assert message in one_line(capsys)
    assert not out.exists()


class SimulatedKill(Exception):
    pass


def test_resume_after_a_kill_between_version_and_checkpoint(
    data: Path, collided, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after version 2 was written, before the checkpoint of task 2: --resume redoes task 2 and
    writes the same version 2 as the uninterrupted run."""
    out = tmp_path / "run"
    real = runner.ContinualRun.save_progress

    def killed(self) -> None:
        if self.finished == 2:
            raise SimulatedKill
        real(self)

    monkeypatch.setattr(runner.ContinualRun, "save_progress", killed)
    with pytest.raises(SimulatedKill):
        run(load_config(TINY, settings(data, ["alpha", "beta"], "versions.max_forgetting=10")), out)
    assert sorted(entries(out)) == [1, 2] and (out / "versions" / "v2").is_dir()
    assert read(out / "checkpoint" / "latest.json")["finished"] == 1
    monkeypatch.undo()
    results = run(None, out, resume=True)
    assert results["held_back"] == [2] and results["resumed_after"] == [1]
    reference = collided[0]
    timeless = lambda e: {k: v for k, v in e.items() if k != "time"}  # noqa: E731
    assert {k: timeless(e) for k, e in entries(out).items()} == {
        k: timeless(e) for k, e in entries(reference).items()
    }
    assert history(out) == [(1, "run")] and read(out / "versions.json")["promoted"] == 1
    for k in (1, 2):
        assert same_weights(out / "versions" / f"v{k}", reference / "versions" / f"v{k}")


def test_the_versions_keys_are_harmless(tmp_path: Path) -> None:
    """They decide what adapter/ serves, never a score: the checkpoint's config hash ignores them (an older
    config's hash is unchanged) and a --resume may change them."""
    base = load_config(TINY)
    guarded = load_config(TINY, ["versions.max_forgetting=5", "versions.keep=2", "versions.guard_set=/g"])
    assert result_relevant_config(base) == result_relevant_config(guarded)
    assert "versions" not in result_relevant_config(guarded)
    older = base.model_dump(mode="json")
    del older["versions"]  # a config.yaml written before the section existed
    assert result_relevant_config(build_config(older)) == result_relevant_config(base)
    write_config(tmp_path, base)
    assert resumed_config(tmp_path, guarded) == guarded
