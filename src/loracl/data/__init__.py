"""Benchmark data: task formats, loaders and task orders."""

from loracl.data.benchmarks import ORDERS, benchmark_names, load_benchmark, load_tasks
from loracl.data.formats import (
    EXACT_MATCH,
    ROUGE_L,
    Example,
    Task,
    load_cl_benchmark_task,
    load_jsonl_task,
    load_olora_task,
    load_superni_task,
    olora_prompt,
)
from loracl.data.paths import default_data_root

__all__ = [
    "EXACT_MATCH",
    "ORDERS",
    "ROUGE_L",
    "Example",
    "Task",
    "benchmark_names",
    "default_data_root",
    "load_benchmark",
    "load_cl_benchmark_task",
    "load_jsonl_task",
    "load_olora_task",
    "load_superni_task",
    "load_tasks",
    "olora_prompt",
]
