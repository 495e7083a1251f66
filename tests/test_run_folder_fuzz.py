"""Fuzzing the readers of what a run folder holds before a resume or a bench rerun (latest.json, the
checkpoint's results.json, the run's results.json and config.yaml): whatever the bytes, they return or
raise one of loracl's one-line errors, never anything else. (Adapter manifests and eval/export/predict:
tests/test_damaged_folders.py; data files: tests/test_robustness.py.)"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loracl.errors import LoraclError
from loracl.recipes import run as runner
from loracl.recipes.checkpoint import FORMAT, VERSION, read_checkpoint

SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)  # noqa: E501
# latest.json: mostly well-formed pointers with one field off, so the checks past the first are reached too.
POINTER = st.fixed_dictionaries(
    {
        "format": st.just(FORMAT) | st.just(FORMAT) | JSON,
        "version": st.just(VERSION) | st.just(VERSION) | JSON,
        "directory": st.just("task-001")
        | st.just("task-001")
        | st.sampled_from(["../task-001", "/etc", ""])
        | JSON,
        "finished": st.sampled_from([1, 2, 0, -1, True]) | JSON,
        "config_hash": st.just("abc"),
    }
)


def content(shape: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    as_json = shape.map(lambda data: json.dumps(data).encode())
    cut = st.tuples(as_json, st.integers(0, 80)).map(lambda pair: pair[0][: pair[1]])
    return as_json | cut | st.binary(max_size=40)


def _valid_state() -> bytes:
    buffer = io.BytesIO()
    torch.save({"peft_configs": {}, "tensors": {}, "method": {}}, buffer)
    return buffer.getvalue()


STATE = st.just(_valid_state()) | st.binary(max_size=60)  # a readable state lets the later checks run
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(latest=content(POINTER | JSON), results=st.just(b"{}") | content(JSON), state=STATE)
@example(  # 'finished' a list: a traceback before latest.json was checked field by field
    latest=json.dumps({"format": FORMAT, "version": 2, "directory": "task-001", "finished": [1],
                       "config_hash": "abc"}).encode(),
    results=b"{}",
    state=_valid_state(),
)  # fmt: skip
def test_reading_a_checkpoint_never_crashes(latest: bytes, results: bytes, state: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "checkpoint"
        (root / "task-001").mkdir(parents=True)
        (root / "latest.json").write_bytes(latest)
        (root / "task-001" / "results.json").write_bytes(results)
        (root / "task-001" / "state.pt").write_bytes(state)
        with contextlib.suppress(LoraclError):
            read_checkpoint(Path(tmp), "abc", torch.device("cpu"))


@FUZZ
@given(results=content(JSON | st.fixed_dictionaries({"complete": JSON, "loracl_version": JSON})),
       config=content(JSON) | st.text(max_size=40).map(str.encode))  # fmt: skip
def test_reading_a_runs_own_files_never_crashes(results: bytes, config: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        (run_dir / "results.json").write_bytes(results)
        (run_dir / "config.yaml").write_bytes(config)
        done = runner.already_complete(run_dir)
        assert done is None or done["complete"] is True
        assert isinstance(runner.is_loracl_run(run_dir), bool)
        with contextlib.suppress(LoraclError):
            runner.resumed_config(run_dir, None)
