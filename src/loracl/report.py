"""Run outputs for people: the Markdown report and the accuracy-matrix heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def matrix_table(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    lines = ["| after task | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    if results.get("zero_shot"):
        lines.append("| (zero-shot) | " + " | ".join(_fmt(v) for v in results["zero_shot"]) + " |")
    for i, row in enumerate(results["matrix"]):
        cells = [f"**{_fmt(v)}**" if j == i else _fmt(v) for j, v in enumerate(row)]
        lines.append(f"| {i + 1}. {tasks[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_line(metrics: dict[str, float | None]) -> str:
    return "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())


def setup_line(results: dict[str, Any]) -> str:
    c = results.get("config") or {}
    if not c:
        return ""
    lora, train, bench = c["lora"], c["train"], c["benchmark"]
    options = {k: v for k, v in c["method"].items() if k != "name"}
    opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
    return (
        f"Setup: method options {opts}; LoRA r={lora['r']}, alpha={lora['alpha']} on "
        f"{', '.join(lora['target_modules'])}; lr {train['lr']}, {train['epochs']} epoch(s), batch "
        f"{train['batch_size']}x{train['grad_accum']}, max length {train['max_length']}, "
        f"seed {train['seed']}; "
        f"caps: {bench['max_train'] or 'all'} train / {bench['max_test'] or 'all'} test examples per task."
    )


def write_report(results: dict[str, Any], path: Path) -> None:
    m = results["metrics"]
    per_task = results["per_task"]
    rows = "\n".join(
        f"| {i + 1}. {t['task']} | {t['train_examples']} | {t['test_examples']} | {t['train_seconds']:.1f} | "
        f"{t['eval_seconds']:.1f} | {t['train_tokens_per_s']:.0f} | {t['final_loss']:.3f} | "
        f"{_bytes(t['adapter_bytes'])} | {t['stored_adapters']} |"
        for i, t in enumerate(per_task)
    )
    data_note = "" if results["data_free"] else " (not data-free: stores past examples)"
    text = f"""# Continual-learning run: {results["method"]}{data_note}

Model `{results["model"]}`, benchmark `{results["benchmark"]}`, {len(results["tasks"])} tasks:
{" → ".join(results["tasks"])}.

{setup_line(results)}

## Metrics (percent)

| AP | BWT | FWT | Forgetting |
|---|---|---|---|
| {_fmt(m["AP"])} | {_fmt(m["BWT"])} | {_fmt(m["FWT"])} | {_fmt(m["forgetting"])} |

AP = mean score on all tasks after the last one; BWT = mean change on earlier tasks since they were learned;
FWT = score on the next task before training on it, minus the base model's; see METHODS.md.

## Accuracy matrix

Row i: scores on every task after training task i (diagonal in bold).

{matrix_table(results)}

![accuracy matrix](matrix.png)

## Per task

| task | train ex. | test ex. | train s | eval s | train tok/s | final loss | adapter | adapters |
|---|---|---|---|---|---|---|---|---|
{rows}

Total: train {results["timings"]["train_total"]:.0f} s, eval {results["timings"]["eval_total"]:.0f} s,
wall {results["timings"]["wall"]:.0f} s on `{results["device"]}`.
The final adapter is in `adapter/` (stock PEFT format).
"""
    path.write_text(text, encoding="utf-8")


def plot_matrix(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    matrix = results["matrix"]
    size = max(4.0, 0.6 * len(tasks) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), labels=[f"after {i + 1}. {t}" for i, t in enumerate(tasks)])
    ax.set_xlabel("evaluated task")
    ax.set_title(
        f"{results['method']}: AP {_fmt(results['metrics']['AP'])}, BWT {_fmt(results['metrics']['BWT'])}"
    )
    if len(tasks) <= 16:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
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
