"""What SLAO's init and merge do to the weight update, read from a finished `slao` run's saved adapters.

For each task i >= 2, averaged over the adapted layers (Delta = B A; relative changes use Frobenius norms):
- init_change: |B_ft,i-1 A_init,i - B_ft,i-1 A_ft,i-1| / |B_ft,i-1 A_ft,i-1|, how far the orthogonal init
  (A_init = orthonormal basis of the rows of A_ft,i-1, B_init = B_ft,i-1; METHODS.md) moves the update the
  model starts task i from. It is 0 only when A_ft,i-1 already has orthonormal rows.
- swap_change: |B_m,i-1 A_ft,i - B_m,i-1 A_m,i-1| / |B_m,i-1 A_m,i-1|, how far replacing A by the new A_ft,i
  (the merge keeps B_m,i-1's share but pairs it with the new A) moves the update the old tasks relied on.
- merge_gap: |Delta_m,i - Delta_ft,i| / |Delta_ft,i|, how far the merged model (evaluated, exported) is
  from the one just fine-tuned on task i.
- prev_a_row_norm: mean row norm of A_ft,i-1 (PEFT's random init gives about 0.58; an orthonormal basis 1).
A run with the option `rebase_b` (not in the paper) starts task i from B_ft,i-1 C and merges B_m,i-1 C,
C = A_ft,i-1 A_init^T: its init_change is 0 by construction and swap_change pairs B_m,i-1 C with A_ft,i.

Usage: python benchmarks/slao_drift.py RUN_DIR (a `loracl run` directory of method slao; reads
RUN_DIR/tasks/<k>-<task>/adapter_ft and adapter_merged). No model is loaded; it takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from cost_common import print_figures, run_main

from loracl.errors import ConfigError
from loracl.methods.slao import basis_coefficients, orthonormal_row_basis
from loracl.models.lora import LoraPair, LoraState, read_adapter_state


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm())


def drift(
    previous_ft: LoraPair,
    previous_merged: LoraPair,
    finetuned: LoraPair,
    merged: LoraPair,
    rebase_b: bool = False,
) -> dict:
    """The figures of one layer at one task boundary (see the module's docstring)."""
    start = previous_ft.B @ previous_ft.A
    kept = previous_merged.B @ previous_merged.A
    basis = orthonormal_row_basis(previous_ft.A)
    rebase = basis_coefficients(previous_ft.A, basis) if rebase_b else torch.eye(basis.shape[0])
    return {
        "init_change": relative_change(previous_ft.B @ rebase @ basis, start),
        "swap_change": relative_change(previous_merged.B @ rebase @ finetuned.A, kept),
        "merge_gap": relative_change(merged.B @ merged.A, finetuned.B @ finetuned.A),
        "prev_a_row_norm": float(previous_ft.A.norm(dim=1).mean()),
    }


def mean_over_layers(
    previous_ft: LoraState, previous_merged: LoraState, ft: LoraState, merged: LoraState, rebase_b: bool
) -> dict[str, float]:
    rows = [drift(previous_ft[k], previous_merged[k], ft[k], merged[k], rebase_b) for k in ft]
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def task_dirs(run_dir: Path) -> list[Path]:
    dirs = sorted((run_dir / "tasks").glob("*-*"), key=lambda d: int(d.name.split("-", 1)[0]))
    if len(dirs) < 2 or not all((d / "adapter_merged").is_dir() for d in dirs):
        raise ConfigError(f"{run_dir}: not a slao run with 2+ finished tasks (tasks/*/adapter_merged)")
    return dirs


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished `loracl run` directory of method slao")
    args = parser.parse_args(argv)
    dirs = task_dirs(args.run_dir)
    results = args.run_dir / "results.json"
    options = json.loads(results.read_text()).get("method_options", {}) if results.is_file() else {}
    rebase_b = bool(options.get("rebase_b", False))
    ft = [read_adapter_state(d / "adapter_ft") for d in dirs]
    merged = [read_adapter_state(d / "adapter_merged") for d in dirs]
    figures = {}
    for i in range(1, len(dirs)):
        for key, value in mean_over_layers(ft[i - 1], merged[i - 1], ft[i], merged[i], rebase_b).items():
            figures[f"{key}_task{i + 1}"] = value
        print(
            f"task {i + 1} ({dirs[i].name.split('-', 1)[1]}): "
            + ", ".join(
                f"{k} {figures[f'{k}_task{i + 1}']:.3f}"
                for k in ("init_change", "swap_change", "merge_gap", "prev_a_row_norm")
            )
        )
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
