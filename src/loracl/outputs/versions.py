"""Adapter versions and the forgetting guard.

Every finished training step k of a run keeps the adapter the run would serve had it ended there, as
`versions/v<k>/`: what the method's `export` writes (a stock PEFT folder for single-adapter methods such as
SLAO, the loracl multi-adapter layout for inc_lora, olora, inflora and gainlora). `versions.json` at the run
root records each version: version, task, index (the step, as in tasks/<index>-<task>/), time, scores (row k
of the accuracy matrix), guard_scores (with a guard set), metrics (AP, BWT, FWT, forgetting of the matrix's
first k rows and columns), drop, measured_on, limit, config_hash, status, held_back and bytes; at the top,
`promoted` (the version adapter/ holds) and `history` (every promotion: version, time, by "run" or
"promote"). A version's status is "promoted" (it passed the guard, or `loracl promote` chose it),
"candidate" (held back, never promoted) or "deleted" (its folder pruned by versions.keep).

Cost: one adapter per finished task. SLAO's adapter has a constant size, so its versions cost T x one
adapter; methods whose adapters grow with the tasks (inc_lora, olora, inflora, gainlora) cost the sum of
their sizes. `versions.keep: N` (`--keep-versions N`) bounds it: after each new version the folders of the
versions older than the N newest are deleted, never the promoted one's (so at most N + 1 folders); their
entries stay in versions.json, status "deleted".

Forgetting guard (`versions.max_forgetting: X`, `--max-forgetting X`, in points). The drop of version k is
the mean over the earlier tasks j < k of a[j][j] - a[k][j], a[i][j] the score on task j after step i: the
accuracy matrix (the tasks' test scores; with the guard on, every row evaluates every task learned so far,
whatever eval.matrix), or with `versions.guard_set: DIR` (`--guard-set DIR`) the scores on DIR/<task>.jsonl
(examples in the jsonl benchmark's fields, prompts as the model sees them), each evaluated after its task
is learned and after every later task. Version 1 has no drop. A version whose drop exceeds X is kept as a
candidate, not promoted: adapter/ goes on serving the last promoted version. A held-back candidate does not
stop the sequence: the next task trains on from the method's state as usual (the guard decides what is
served, not what is learned). When the last version is held back, results.json says so (`held_back`: the
versions newer than the served one, `promoted_version`), report.md's "Adapter versions" section says why
(drop against limit), and `loracl run` exits with status 3 (loracl.errors.HELD_BACK_EXIT).
adapter/README.md, the run's model card, then notes that its table holds the last version's scores, and
gives the served version's. `loracl promote RUN --version k` serves any kept version instead (a finished
run; the lock taken). Without max_forgetting every version is promoted, so adapter/ holds the last one.
A drop that cannot be measured (an entry not evaluated, a guard set first given at a --resume) holds
nothing back, nor does any drop while no earlier version is served.

Crash safety: version k is written in a temporary folder beside versions/v<k> and renamed, versions.json
atomically, both before the checkpoint of step k (only the main process writes); a run killed between them
redoes step k at --resume and writes v<k> and its entry again, with the same scores. adapter/ is replaced
the same way. `loracl promote` takes the run directory's lock, as a run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracl.config import RunConfig, VersionsSection
from loracl.data import Task
from loracl.data.formats import read_jsonl_examples
from loracl.engine.metrics import all_metrics
from loracl.errors import HELD_BACK_EXIT, ConfigError, DataError, RunFolderError
from loracl.files import fsync_dir, read_json_object, write_failure_reason, write_json_atomic
from loracl.locking import FolderLock
from loracl.outputs.report import LOSS_PLOT, write_report

if TYPE_CHECKING:
    from peft import PeftModel

    from loracl.engine.evaluation import Evaluator
    from loracl.methods import ContinualMethod

VERSIONS_DIR = "versions"
VERSIONS_FILE = "versions.json"
ADAPTER_DIR = "adapter"
CARD = "README.md"  # the model card write_outputs puts in adapter/
CARD_NOTE = "<!-- loracl: adapter version -->"  # starts the card's note on the version adapter/ holds
FORMAT = "loracl-versions"
PROMOTED, CANDIDATE, DELETED = "promoted", "candidate", "deleted"


def version_dir(run_dir: Path, version: int) -> Path:
    return Path(run_dir) / VERSIONS_DIR / f"v{version}"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# -- versions.json -------------------------------------------------------------------------------------------
def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("version")) is int
        and isinstance(entry.get("task"), str)
        and entry.get("status") in (PROMOTED, CANDIDATE, DELETED)
    )


def read_versions(run_dir: Path) -> dict[str, Any] | None:
    """versions.json of a run, or None when it has none; a damaged one is a one-line RunFolderError."""
    path = Path(run_dir) / VERSIONS_FILE
    data = read_json_object(path, RunFolderError)
    if data is None:
        return None
    promoted = data.get("promoted")
    if (
        data.get("format") != FORMAT
        or not isinstance(data.get("versions"), list)
        or not all(_valid_entry(entry) for entry in data["versions"])
        or not isinstance(data.get("history"), list)
        or not all(isinstance(h, dict) and type(h.get("version")) is int for h in data["history"])
        or not (promoted is None or type(promoted) is int)
    ):
        raise RunFolderError(f"{path}: not a loracl versions file (damaged?)")
    return data


def require_versions(run_dir: Path) -> dict[str, Any]:
    """versions.json of a run, refused in one line when there is none."""
    data = read_versions(run_dir)
    if data is None:
        raise ConfigError(
            f"{run_dir}: no adapter versions (no {VERSIONS_FILE}: a run made before loracl kept versions, or "
            "not a run directory)"
        )
    return data


def _entry(data: dict[str, Any], version: int) -> dict[str, Any] | None:
    return next((e for e in data["versions"] if e["version"] == version), None)


def kept_folder(run_dir: Path, data: dict[str, Any], version: int) -> Path:
    """The folder of a kept version; an unknown or deleted one is refused in one line."""
    entry = _entry(data, version)
    if entry is None:
        known = ", ".join(str(e["version"]) for e in data["versions"]) or "none"
        raise ConfigError(f"--version {version}: {run_dir} has no version {version} (its versions: {known})")
    if entry["status"] == DELETED:
        kept = ", ".join(str(e["version"]) for e in data["versions"] if e["status"] != DELETED)
        raise ConfigError(
            f"--version {version}: the folder of version {version} of {run_dir} was deleted "
            f"(versions.keep keeps only the newest); kept: {kept}"
        )
    folder = version_dir(run_dir, version)
    if not (folder.is_dir() and any(folder.iterdir())):
        raise RunFolderError(f"{folder}: missing, though {VERSIONS_FILE} lists version {version} as kept")
    return folder


def new_versions() -> dict[str, Any]:
    """versions.json of a run that has kept no version yet."""
    return {"format": FORMAT, "version": 1, "promoted": None, "history": [], "versions": []}


def served_fields(data: dict[str, Any]) -> dict[str, Any]:
    """results.json's `promoted_version` and `held_back` (the versions newer than the served one)."""
    promoted = data["promoted"]
    newer = [e["version"] for e in data["versions"] if promoted is not None and e["version"] > promoted]
    return {"promoted_version": promoted, "held_back": newer}


def average_drop(diagonal: Sequence[float | None], current: Sequence[float | None]) -> float | None:
    """Mean of diagonal[j] - current[j] (a[j][j] - a[k][j]) over the earlier tasks; None when there are
    none or an entry is missing (not evaluated)."""
    pairs = list(zip(diagonal, current, strict=True))
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return sum(a - b for a, b in pairs) / len(pairs)  # type: ignore[operator]


# -- folders -------------------------------------------------------------------------------------------------
def _clear_leftovers(target: Path) -> None:
    """The temporary siblings of `target` (export's `_sibling` names) a killed writer left; the caller holds
    the run directory's lock, so no live writer owns one."""
    for kind in ("tmp", "old"):
        for stale in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def replace_folder(target: Path, write: Callable[[Path], None]) -> int:
    """Write a folder through `write(staging)` in a temporary sibling, then rename it to `target` (an older
    `target` is set aside first and removed after): never a half-written folder. Returns its bytes."""
    from loracl.outputs.export import _sibling  # torch: only where a folder is written

    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    staging = _sibling(target, "tmp")
    try:
        staging.mkdir()
        write(staging)
        size = _folder_bytes(staging)
        if os.path.lexists(target):
            old = _sibling(target, "old")
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return size


def serve_version(run_dir: Path, version: int, card: str | None = None) -> None:
    """adapter/ <- versions/v<version>, copied and verified (loracl export's copy), with `card` as its
    README.md when given (the model card the run wrote)."""
    from loracl.outputs.export import _copy_adapter  # torch: only when a folder is copied

    def write(staging: Path) -> None:
        _copy_adapter(version_dir(run_dir, version), staging)
        if card is not None:
            (staging / CARD).write_text(card, encoding="utf-8")

    replace_folder(Path(run_dir) / ADAPTER_DIR, write)


def version_card(card: str, run_dir: Path, data: dict[str, Any] | None = None) -> str:
    """The model card of adapter/ with a note when it holds an earlier version than the last, whose scores
    its table shows (any older note replaced); `data`: versions.json (default: read from `run_dir`)."""
    data = read_versions(run_dir) if data is None else data
    card = card.split(f"\n{CARD_NOTE}\n")[0]
    newer = served_fields(data)["held_back"] if data else []
    served = _entry(data, data["promoted"]) if data and newer else None
    if served is None:
        return card
    scores = ", ".join(_points(score) for score in served["scores"])
    return (
        f"{card}\n{CARD_NOTE}\n**This folder holds adapter version {served['version']}** (after step "
        f"{served['version']}, {served['task']}), not the last: the table above shows the last version's "
        f"scores (not promoted: version {', '.join(map(str, newer))}). Its own scores, task by task: "
        f"{scores}. The run's versions.json has every version's.\n"
    )


# -- the run's side ------------------------------------------------------------------------------------------
def read_guard_set(folder: str, tasks: Sequence[Task]) -> list[Task]:
    """Each task with its guard examples (DIR/<task>.jsonl) as its test and validation split, so the run's
    evaluator scores them with the task's metric and labels; refused in one line if a file is missing or
    malformed."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"versions.guard_set: {folder} is not a folder (one <task>.jsonl per task)")
    guarded = []
    for task in tasks:
        path = root / f"{task.name}.jsonl"
        if not path.is_file():
            raise ConfigError(f"versions.guard_set: {path} is missing (one <task>.jsonl per task of the run)")
        try:
            examples = read_jsonl_examples(path, task.labels)
        except DataError as exc:
            raise ConfigError(f"versions.guard_set: {exc}") from None
        guarded.append(dataclasses.replace(task, test=examples, validation=examples))
    return guarded


@dataclass
class AdapterVersions:
    """A run's versions: keeps each step's adapter (main process) and applies the forgetting guard."""

    run_dir: Path
    settings: VersionsSection
    guard_tasks: list[Task] | None = None  # the tasks with their guard set as test split, if one is given

    @classmethod
    def of(cls, config: RunConfig, tasks: Sequence[Task], run_dir: Path) -> AdapterVersions:
        """The versions of a run; its guard set read and checked now (before anything is written)."""
        s = config.versions
        guard = read_guard_set(s.guard_set, tasks) if s.guard_set is not None else None
        return cls(Path(run_dir), s, guard)

    @property
    def guarded(self) -> bool:
        return self.settings.max_forgetting is not None

    def guard_scores(
        self, evaluator: Evaluator, model: PeftModel, method: ContinualMethod, learned: int
    ) -> list[float] | None:
        """Scores on the guard sets of the `learned` first tasks (every process evaluates); None without a
        guard set."""
        if self.guard_tasks is None:
            return None
        chosen = self.guard_tasks[:learned]
        found = evaluator.evaluate_tasks(
            model, chosen, "guard set", around=lambda k: method.evaluating(model, k)
        )
        return [outcome.score for outcome in found]

    def keep(
        self,
        method: ContinualMethod,
        model: PeftModel,
        step: int,
        task: str,
        scores: Sequence[float | None],
        results: dict[str, Any],
        guard: list[float] | None,
        config_hash: str,
    ) -> None:
        """Write versions/v<step> (what `method.export` writes now) and its entry; promote it unless the
        guard holds it back; prune beyond versions.keep (main process)."""
        data = read_versions(self.run_dir) or new_versions()
        _forget_from(data, step)
        size = replace_folder(version_dir(self.run_dir, step), lambda staging: method.export(model, staging))
        entry = self._entry(data, step, task, scores, results, guard)
        entry.update(config_hash=config_hash, bytes=size)
        data["versions"].append(entry)
        self._decide(data, entry)
        doomed = self._prune(data)
        # the entries before the deletions: a kill in between leaves a stray folder, removed next time
        write_json_atomic(data, self.run_dir / VERSIONS_FILE)
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)

    def _entry(
        self,
        data: dict[str, Any],
        step: int,
        task: str,
        scores: Sequence[float | None],
        results: dict[str, Any],
        guard: list[float] | None,
    ) -> dict[str, Any]:
        """Version `step`'s entry, less what only the folder's writing tells (bytes) and the decision."""
        matrix, zero_shot = results["matrix"], results["zero_shot"]
        sequential = results.get("matrix_rows") != "final_model"
        if sequential:
            rows = [row[:step] for row in matrix[:step]]
            metrics = all_metrics(rows, zero_shot[:step] if zero_shot else None)
        else:  # one joint training: every row is the final model
            metrics = all_metrics(matrix, zero_shot, sequential=False)
        entry: dict[str, Any] = {"version": step, "task": task, "index": step, "time": _now()}
        entry["scores"] = list(scores)
        if guard is not None:
            entry["guard_scores"] = guard
        entry["metrics"] = metrics
        entry["drop"] = _drop(data, step, matrix, guard) if sequential else None
        entry["measured_on"] = "guard_set" if guard is not None else results.get("eval_split", "test")
        entry["limit"] = self.settings.max_forgetting
        return entry

    def _decide(self, data: dict[str, Any], entry: dict[str, Any]) -> None:
        """Promote the new version, unless its drop exceeds the limit while an earlier version can be served
        instead."""
        limit, drop = entry["limit"], entry["drop"]
        held = limit is not None and drop is not None and drop > limit and data["promoted"] is not None
        entry["held_back"] = held
        entry["status"] = CANDIDATE if held else PROMOTED
        if held:
            print(
                f"  version {entry['version']} held back: average drop {drop:.1f} points on earlier tasks "
                f"({entry['measured_on']}) > --max-forgetting {limit:g}; adapter/ keeps version "
                f"{data['promoted']}"
            )
            return
        data["promoted"] = entry["version"]
        data["history"].append({"version": entry["version"], "time": entry["time"], "by": "run"})

    def _prune(self, data: dict[str, Any]) -> list[Path]:
        """Mark deleted the versions older than the `keep` newest, the promoted one excepted; the folders to
        remove (those, and any a killed run left of versions already marked deleted)."""
        keep = self.settings.keep
        if keep is not None:
            newest = sorted(e["version"] for e in data["versions"])[-keep:]
            for e in data["versions"]:
                if e["version"] not in newest and e["version"] != data["promoted"]:
                    e["status"] = DELETED
        gone = [version_dir(self.run_dir, e["version"]) for e in data["versions"] if e["status"] == DELETED]
        return [folder for folder in gone if os.path.lexists(folder)]

    def install(self, method: ContinualMethod, model: PeftModel) -> dict[str, Any]:
        """adapter/ at the end of the run: the promoted version's folder (main process); results.json's
        `promoted_version` and `held_back`. A run without versions (begun before loracl kept them) exports
        the final model, as before."""
        data = read_versions(self.run_dir)
        if data is None or data["promoted"] is None:
            method.export(model, self.run_dir / ADAPTER_DIR)
            return {}
        kept_folder(self.run_dir, data, data["promoted"])  # removed by hand: refused, never copied empty
        serve_version(self.run_dir, data["promoted"])
        fields = served_fields(data)
        if fields["held_back"]:
            print(
                f"adapter/ serves version {data['promoted']}; held back by the forgetting guard: "
                f"{', '.join(map(str, fields['held_back']))} (exit status {HELD_BACK_EXIT}); serve one with: "
                f"loracl promote {self.run_dir} --version {fields['held_back'][-1]}"
            )
        return fields


def _forget_from(data: dict[str, Any], step: int) -> None:
    """Drop what a step being (re)done and any later one left (a run killed after writing them, before
    its checkpoint, redoes the step at --resume)."""
    data["versions"] = [e for e in data["versions"] if e["version"] < step]
    data["history"] = [h for h in data["history"] if h["version"] < step]
    data["promoted"] = data["history"][-1]["version"] if data["history"] else None


def _drop(
    data: dict[str, Any], step: int, matrix: list[list[float | None]], guard: list[float] | None
) -> float | None:
    """Version `step`'s average drop on the earlier tasks: on the guard set when one is scored (a[j][j]
    from version j's entry), else on the accuracy matrix."""
    if guard is None:
        diagonal = [matrix[j][j] for j in range(step - 1)]
        return average_drop(diagonal, matrix[step - 1][: step - 1])
    earlier = {e["version"]: e.get("guard_scores") or [] for e in data["versions"]}
    diagonal = [_at(earlier.get(j + 1, []), j) for j in range(step - 1)]
    return average_drop(diagonal, guard[: step - 1])


def _at(values: Sequence[float | None], index: int) -> float | None:
    return values[index] if index < len(values) else None


# -- commands ------------------------------------------------------------------------------------------------
def _complete_results(run_dir: Path) -> dict[str, Any]:
    results = read_json_object(run_dir / "results.json", RunFolderError)
    if not results or results.get("complete") is not True:
        raise ConfigError(
            f"{run_dir}: the run is not finished; let it finish (loracl run --resume --output {run_dir}) "
            "before promoting a version"
        )
    return results


def rewrite_report(run_dir: Path, results: dict[str, Any]) -> None:
    """report.md again from results.json and versions.json (after a promotion)."""
    loss_plot = LOSS_PLOT if (run_dir / LOSS_PLOT).is_file() else None
    write_report(results, run_dir / "report.md", loss_plot, report_section(run_dir))


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock, as a run does (FolderBusy, one line, while another command has it)."""
    lock = FolderLock(run_dir, "run directory")
    try:
        lock.acquire()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: cannot lock the run directory ({write_failure_reason(exc)})") from exc
    try:
        yield
    finally:
        lock.release()


def _record_promotion(data: dict[str, Any], version: int) -> None:
    entry = _entry(data, version)
    if data["promoted"] != version and entry is not None:
        data["promoted"] = version
        entry["status"] = PROMOTED
        data["history"].append({"version": version, "time": _now(), "by": "promote"})


def promote(run_dir: str | Path, version: int) -> dict[str, Any]:
    """`loracl promote`: serve a kept version from adapter/ (the run's model card kept, its version note
    updated), record it in versions.json, results.json and report.md, under the run directory's lock.
    Promoting the version already served writes the same files again (a repair after a kill). Returns
    the promoted entry."""
    run_dir = Path(run_dir)
    kept_folder(run_dir, require_versions(run_dir), version)  # refusals before the lock is even taken
    _complete_results(run_dir)
    with _locked(run_dir):
        data = require_versions(run_dir)  # again, now that no run can be writing it
        kept_folder(run_dir, data, version)
        results = _complete_results(run_dir)
        _record_promotion(data, version)
        card = run_dir / ADAPTER_DIR / CARD
        note = version_card(card.read_text(encoding="utf-8"), run_dir, data) if card.is_file() else None
        serve_version(run_dir, version, note)
        write_json_atomic(data, run_dir / VERSIONS_FILE)
        results.update(served_fields(data))
        write_json_atomic(results, run_dir / "results.json")
        rewrite_report(run_dir, results)
        return _entry(data, version)  # type: ignore[return-value]


def export_version(
    run_dir: str | Path, version: int, target: str | Path, merge: bool = False, overwrite: bool = False
) -> Path:
    """`loracl export RUN --version k`: `loracl export` of versions/v<k> instead of adapter/."""
    from loracl.outputs.export import export

    folder = kept_folder(Path(run_dir), require_versions(Path(run_dir)), version)
    return export(run_dir, target, merge=merge, overwrite=overwrite, adapter_dir=folder)


# -- tables --------------------------------------------------------------------------------------------------
def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _status(entry: dict[str, Any], promoted: int | None) -> str:
    if entry["version"] == promoted:
        return "promoted (served)"
    if entry["status"] == CANDIDATE:
        return "candidate (held back)"
    if entry["status"] == DELETED and entry.get("held_back"):
        return "deleted (was held back)"
    return entry["status"]


def _rows(data: dict[str, Any], with_time: bool) -> list[list[str]]:
    rows = []
    for e in sorted(data["versions"], key=lambda e: e["version"]):
        ap = (e.get("metrics") or {}).get("AP")
        row = [str(e["version"]), e["task"], *([e.get("time", "")] if with_time else [])]
        rows.append([*row, _points(ap), _points(e.get("drop")), _status(e, data["promoted"])])
    return rows


def listing(run_dir: str | Path) -> str:
    """`loracl versions`: one aligned line per version, and which one adapter/ serves."""
    run_dir = Path(run_dir)
    data = require_versions(run_dir)
    header = ["version", "task", "time", "AP so far", "drop", "status"]
    table = [header, *_rows(data, with_time=True)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join([*lines, "", _served_line(data, run_dir)])


def _served_line(data: dict[str, Any], run_dir: Path) -> str:
    """Which version adapter/ serves, and the newer ones it does not."""
    promoted = data["promoted"]
    if promoted is None:
        return "adapter/ serves no version yet (the run has not finished a task)"
    served = _entry(data, promoted)
    line = f"adapter/ serves version {promoted}" + (f" ({served['task']})" if served else "")
    newer = served_fields(data)["held_back"]
    if newer:
        line += f", not the last: newer, not promoted: {', '.join(map(str, newer))}"
        line += f" (serve one with: loracl promote {run_dir} --version K)"
    return line


def _held_back_lines(data: dict[str, Any]) -> list[str]:
    """Why each version newer than the served one was held back (drop against limit)."""
    lines = []
    for e in sorted(data["versions"], key=lambda e: e["version"]):
        if e.get("held_back") and e["version"] > (data["promoted"] or 0):
            v = e["version"]
            where = (
                "its folder was deleted (versions.keep)" if e["status"] == DELETED else f"in versions/v{v}/"
            )
            lines.append(
                f"- version {v} ({e['task']}) held back: average drop {_points(e['drop'])} points on earlier "
                f"tasks ({e.get('measured_on')}) > limit {e['limit']:g}; {where}"
            )
    return lines


def _guard_line(data: dict[str, Any]) -> str:
    limits = [e["limit"] for e in data["versions"] if e.get("limit") is not None]
    if not limits:
        return "No forgetting guard: every version was promoted as it came."
    return (
        f"Forgetting guard: a version is promoted when its average drop on the earlier tasks, the mean over "
        f"j < k of a[j][j] - a[k][j], is at most {limits[-1]:g} points."
    )


def report_section(run_dir: str | Path) -> str:
    """report.md's "Adapter versions" section, from versions.json ("" for a run without versions)."""
    run_dir = Path(run_dir)
    data = read_versions(run_dir)
    if data is None or not data["versions"]:
        return ""
    table = [["version", "task", "AP so far", "drop", "status"], *_rows(data, with_time=False)]
    rows = ["| " + " | ".join(row) + " |" for row in table]
    rows.insert(1, "|---" * len(table[0]) + "|")
    text = (
        f"{_served_line(data, run_dir)}. Every finished task's adapter is kept in versions/v<k>/, its "
        f"scores in {VERSIONS_FILE} (`loracl versions {run_dir}`). {_guard_line(data)} AP so far: the mean "
        "score on the tasks learnt up to that version; drop: in points."
    )
    held = _held_back_lines(data)
    held_lines = ["", *held] if held else []
    return "\n".join(["\n## Adapter versions\n", textwrap.fill(text, 110), "", *rows, *held_lines, ""])
