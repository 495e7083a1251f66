"""Test-wide settings."""

import os

# The tiny test models' matrices are far too small to gain from several threads, and on a busy 2-core
# machine the threads only thrash (a tiny run: ~1 s with one thread, ~13 s with two under load). Set before
# torch is imported, so the subprocesses that tests launch inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
