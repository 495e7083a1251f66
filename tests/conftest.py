"""Test-wide settings."""

import os
from pathlib import Path

# The tiny test models' matrices are far too small to gain from several threads, and on a busy 2-core
# machine the threads only thrash (a tiny run: ~1 s with one thread, ~13 s with two under load). Set before
# torch is imported, so the subprocesses that tests launch inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Progress lines on a non-terminal stderr (every 30 s by default) would interleave with the one-line errors
# the tests read; the test of those lines sets its own interval.
os.environ.setdefault("LORACL_PROGRESS_SECONDS", "3600")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def shared_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared benchmark data folder (../shared/data), or a skip where it is not beside the checkout."""
    from loracl.data import default_data_root
    from loracl.errors import DataError

    monkeypatch.delenv("LORACL_DATA_DIR", raising=False)
    try:
        root = default_data_root()
    except DataError:
        pytest.skip("shared benchmark data not found")
    if not (root / "cl_benchmark").is_dir() or not (root / "superni_sample").is_dir():
        pytest.skip("shared benchmark data not found")
    return root
