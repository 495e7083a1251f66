"""Benchmark data: task formats, loaders and task orders."""

from loracl.data.benchmarks import (
    ORDER_BENCHMARK,
    ORDERS,
    benchmark_names,
    default_order,
    folder_tasks,
    load_benchmark,
    order_tasks,
    orders_for,
)
from loracl.data.formats import (
    EXACT_MATCH,
    ROUGE_L,
    TRACE_METRICS,
    Example,
    Task,
    load_cl_benchmark_task,
    load_jsonl_task,
    load_olora_task,
    load_superni_task,
    load_superni_task_dir,
    load_trace_task,
    olora_prompt,
)
from loracl.data.paths import default_data_root
from loracl.data.tasks import load_tasks, resolve_benchmark

__all__ = [
    "EXACT_MATCH",
    "ORDERS",
    "ORDER_BENCHMARK",
    "ROUGE_L",
    "TRACE_METRICS",
    "Example",
    "Task",
    "benchmark_names",
    "default_data_root",
    "default_order",
    "folder_tasks",
    "load_benchmark",
    "load_cl_benchmark_task",
    "load_jsonl_task",
    "load_olora_task",
    "load_superni_task",
    "load_superni_task_dir",
    "load_tasks",
    "load_trace_task",
    "olora_prompt",
    "order_tasks",
    "orders_for",
    "resolve_benchmark",
]
