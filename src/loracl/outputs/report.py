"""Run outputs for people: the Markdown report, the accuracy-matrix heatmap and the training-loss curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loracl.engine.metrics import is_complete
from loracl.files import UnsafeFileError, read_text_limited

LOSS_PLOT = "loss.png"  # in the run directory, beside report.md
TRAIN_LOG = "train_log.jsonl"  # in each training step's folder tasks/<i>-<task>/ (tasks/joint/ for mtl)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def matrix_entry(value: float | None) -> str:
    """An accuracy-matrix entry; None is one not evaluated (`eval.matrix: metrics`)."""
    return "–" if value is None else f"{value:.1f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


ROLE_LABELS = {
    "continual": "",
    "upper_bound": " — upper bound (joint training on all tasks), not a continual method",
    "reference": " — reference point (no training), not a continual method",
}

MATRIX_ROWS = {
    "after_each_task": "Row i: scores on every task after training task i (diagonal in bold).",
    "final_model": "Every row holds the final model's scores: one joint training on the union of all tasks "
    "(an upper bound); only AP is defined, BWT/FWT/forgetting are n/a.",
    "unchanged_model": "The model is never trained: every row holds the same scores.",
}


def sparse_note(results: dict[str, Any]) -> str:
    if is_complete(results["matrix"]):
        return ""
    return (
        " Entries shown – were not evaluated: `eval.matrix: metrics` evaluates only those AP, BWT and FWT "
        "read (forgetting needs them all)."
    )


def matrix_table(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    final_only = results.get("matrix_rows") == "final_model"
    lines = ["| after task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    if results.get("zero_shot"):
        lines.append("| (zero-shot) | " + " | ".join(_fmt(v) for v in results["zero_shot"]) + " |")
    for i, row in enumerate(results["matrix"]):
        cells = [
            f"**{matrix_entry(v)}**" if j == i and not final_only else matrix_entry(v)
            for j, v in enumerate(row)
        ]
        label = "(final, joint)" if final_only else f"{i + 1}. {tasks[i]}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def method_info_table(per_task: list[dict[str, Any]]) -> str:
    """One row per training step, one column per key any step's `method_info` has; empty if none has any.
    Values that are containers (e.g. basis sizes per layer) stay in results.json, out of the table."""
    keys: list[str] = []
    for t in per_task:
        info = t.get("method_info", {})
        keys.extend(k for k, v in info.items() if k not in keys and not isinstance(v, dict | list))
    if not keys:
        return ""
    lines = ["| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, t in enumerate(per_task):
        info = t.get("method_info", {})
        lines.append(f"| {i + 1}. {t['task']} | " + " | ".join(_cell(info.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _data_line(results: dict[str, Any]) -> str:
    if results["data_free"]:
        return "Data-free: yes (no example of a finished task is kept or used later)."
    return (
        "Data-free: **no**: it trains on examples of tasks other than the current one (a stored memory, "
        "or every task's data at once); the method details give the memory where there is one."
    )


def metrics_line(metrics: dict[str, float | None]) -> str:
    return "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def setup_line(results: dict[str, Any]) -> str:
    c = results.get("config") or {}
    if not c:
        return ""
    lora, train, bench = c["lora"], c["train"], c["benchmark"]
    targets = results.get("lora_targets", lora["target_modules"])  # runs before it recorded only the config
    on = targets if isinstance(targets, str) else ", ".join(targets)
    return (
        f"Setup: LoRA r={lora['r']}, alpha={lora['alpha']} on "
        f"{on}; lr {train['lr']}, {train['epochs']} epoch(s), batch "
        f"{train['batch_size']}x{train['grad_accum']}, max length {train['max_length']}, "
        f"seed {train['seed']}; "
        f"caps: {bench['max_train'] or 'all'} train / {bench['max_test'] or 'all'} test examples per task."
        + _init_adapter_note(results.get("init_adapter"))
    )


def _init_adapter_note(init: dict[str, Any] | None) -> str:
    """The setup line's note on `lora.init_adapter`: the run's task 0, trained before it, never evaluated."""
    if not init:
        return ""
    digest = init["sha256"][:12]
    return f" Started from the adapter `{init['folder']}` (task 0, not evaluated; sha256 {digest}...)."


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _other_conventions_line(results: dict[str, Any]) -> str:
    """The same matrix under the conventions of GainLoRA's score.py, labelled as such (not our headline)."""
    other = results.get("metrics_other_conventions") or {}
    if not other or all(v is None for v in other.values()):
        return ""
    bwt, diagonal = _fmt(other.get("BWT_over_T")), _fmt(other.get("mean_diagonal"))
    return (
        f"Other conventions (GainLoRA's score.py): BWT over T instead of T - 1 {bwt}; its \"FWT\", the "
        f"mean of a[j][j], {diagonal}.\n"
    )


def split_line(results: dict[str, Any]) -> str:
    """What the scores are over, said when it is not the test split."""
    if results.get("eval_split", "test") != "validation":
        return ""
    fraction = ((results.get("config") or {}).get("benchmark") or {}).get("validation_fraction")
    share = (
        f" (a fraction {fraction:g} of each task's training examples, held out of training)"
        if fraction
        else ""
    )
    return (
        f"Every score is on the **validation** split{share}, not on test: no test file was read by this "
        "run.\n"
    )


def loss_section(loss_plot: str | None) -> str:
    if loss_plot is None:
        return ""
    return (
        "\n## Training loss\n\n"
        "Loss of every training step (cross-entropy of the answer tokens), the tasks one after the other; "
        "dashed, right axis: the learning rate at each optimizer step. Per step in "
        f"`tasks/<i>-<task>/{TRAIN_LOG}`.\n\n"
        f"![training loss]({loss_plot})\n"
    )


def write_report(
    results: dict[str, Any], path: Path, loss_plot: str | None = None, appendix: str = ""
) -> None:
    """report.md; `loss_plot`: the loss curves' file name beside it, None when there is none (no training);
    `appendix`: sections added at the end (the adapter versions, loracl.outputs.versions)."""
    m = results["metrics"]
    per_task = results["per_task"]
    split = "validation" if results.get("eval_split") == "validation" else "test"
    rows = "\n".join(
        f"| {i + 1}. {t['task']} | {t['train_examples']} | {t.get('eval_examples', t['test_examples'])} | "
        f"{t['train_seconds']:.1f} | "
        f"{t['eval_seconds']:.1f} | {t['train_tokens_per_s']:.0f} | {_loss(t['final_loss'])} | "
        f"{_bytes(t['adapter_bytes'])} | {t['stored_adapters']} |"
        for i, t in enumerate(per_task)
    )
    data_note = "" if results["data_free"] else " (not data-free)"
    role = ROLE_LABELS.get(results.get("role", "continual"), "")
    options = ", ".join(f"{k}={v}" for k, v in results.get("method_options", {}).items()) or "none"
    info = method_info_table(per_task)
    details = f"\n## Method details\n\n{info}\n" if info else ""
    text = f"""# Continual-learning run: {results["method"]}{role}{data_note}

Model `{results["model"]}`, benchmark `{results["benchmark"]}`, {len(results["tasks"])} tasks:
{" → ".join(results["tasks"])}.
Method options: {options}.
{_data_line(results)}

{setup_line(results)}
{split_line(results)}
## Metrics (percent)

| AP | BWT | FWT | Forgetting |
|---|---|---|---|
| {_fmt(m["AP"])} | {_fmt(m["BWT"])} | {_fmt(m["FWT"])} | {_fmt(m["forgetting"])} |

AP = mean score on all tasks after the last one; BWT = mean change on earlier tasks since they were learned;
FWT = score on the next task before training on it, minus the base model's; see METHODS.md.
{_other_conventions_line(results)}

## Accuracy matrix

{MATRIX_ROWS.get(results.get("matrix_rows", "after_each_task"), "")}{sparse_note(results)}

{matrix_table(results)}

![accuracy matrix](matrix.png)

## Per task

| task | train ex. | {split} ex. | train s | eval s | train tok/s | final loss | adapter | adapters |
|---|---|---|---|---|---|---|---|---|
{rows}
{details}{loss_section(loss_plot)}
Total: train {results["timings"]["train_total"]:.0f} s, eval {results["timings"]["eval_total"]:.0f} s,
wall {results["timings"]["wall"]:.0f} s on `{results["device"]}`.
The final adapter is in `adapter/` (stock PEFT format).
{appendix}"""
    path.write_text(text, encoding="utf-8")


def plot_matrix(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    matrix = [[math.nan if v is None else v for v in row] for row in results["matrix"]]  # NaN: blank
    size = max(4.0, 0.6 * len(tasks) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right")
    if results.get("matrix_rows") == "final_model":
        row_labels = ["final (joint)"] * len(tasks)
    else:
        row_labels = [f"after {i + 1}. {t}" for i, t in enumerate(tasks)]
    ax.set_yticks(range(len(tasks)), labels=row_labels)
    ax.set_xlabel("evaluated task")
    ax.set_title(
        f"{results['method']}: AP {_fmt(results['metrics']['AP'])}, BWT {_fmt(results['metrics']['BWT'])}"
    )
    if len(tasks) <= 16:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if math.isnan(value):
                    continue
                ax.text(
                    j,
                    i,
                    f"{value:.0f}",
                    ha="center",
                    va="center",
                    color="white" if value < 60 else "black",
                    fontsize=8,
                )
    fig.colorbar(image, ax=ax, label="score (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_log_folder(results: dict[str, Any], index: int) -> str:
    """The folder, under tasks/, of training step `index` (0-based): where the run wrote its train_log."""
    if results.get("matrix_rows") == "final_model":
        return "joint"
    return f"{index + 1}-{results['per_task'][index]['task']}"


def training_curves(results: dict[str, Any], run_dir: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, train_log records) of every training step that trained and left a readable log, read from
    the run directory (so a report can be rebuilt from the folder alone). A missing or damaged log only
    leaves its task out of the plot: the report is no place to fail a finished run."""
    curves = []
    for i, task in enumerate(results["per_task"]):
        if not task.get("train_steps"):
            continue
        path = run_dir / "tasks" / train_log_folder(results, i) / TRAIN_LOG
        try:
            records = [json.loads(line) for line in read_text_limited(path).splitlines() if line.strip()]
            if not all(isinstance(r, dict) and isinstance(r.get("loss"), int | float) for r in records):
                continue
        except (OSError, UnsafeFileError, ValueError):
            continue
        if records:
            curves.append((f"{i + 1}. {task['task']}", records))
    return curves


def plot_losses(results: dict[str, Any], run_dir: Path, path: Path) -> bool:
    """The training loss per step, every task's curve after the previous one's on one step axis (so the
    jumps at task changes show), the learning rate on a second axis; False, and no file (an older one is
    removed), when nothing was trained."""
    curves = training_curves(results, run_dir)
    if not curves:
        path.unlink(missing_ok=True)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    lr_axis = ax.twinx()
    offset = 0
    for k, (label, records) in enumerate(curves):
        color = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")(k % 20)
        steps = list(range(offset + 1, offset + len(records) + 1))
        ax.plot(steps, [r["loss"] for r in records], color=color, linewidth=1, label=label)
        updates = [(s, r["lr"]) for s, r in zip(steps, records, strict=True) if r.get("lr") is not None]
        if updates:
            lr_axis.plot(*zip(*updates, strict=True), color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        if offset:
            ax.axvline(offset + 0.5, color="grey", linewidth=0.5, linestyle=":")
        offset += len(records)
    ax.set_xlabel("training step (tasks in sequence)")
    ax.set_ylabel("loss")
    lr_axis.set_ylim(bottom=0)  # from 0: a constant rate is a flat line, not noise around an offset
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_axis.set_ylabel("learning rate", color="grey")
    lr_axis.tick_params(axis="y", colors="grey")
    ax.set_title(f"{results['method']}: training loss per step")
    ax.legend(fontsize=7, ncol=1 + len(curves) // 8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
