"""loracl.engine.allocator: with glibc's mmap threshold fixed, a freed activation-sized tensor goes back to
the system; with glibc's default (dynamic) threshold it stays in the heap. Each case in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loracl.engine.allocator import USER_SETTING, _glibc

PROBE = """
import sys, torch
from loracl.engine.allocator import fix_mmap_threshold
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
big = torch.ones(32 * 2**20 // 4)
del big  # a freed 32 MiB mapping raises glibc's dynamic threshold above the 8 MiB blocks below
keep, returned = [], []
for _ in range(10):  # 8 MiB, as a step's activations, each followed by a small long-lived tensor
    block = torch.ones(8 * 2**20 // 4)
    keep.append(torch.ones(16))
    before = rss_mib()
    del block
    returned.append(before - rss_mib())
print(min(returned))
"""

GLIBC_LINUX = _glibc() is not None and os.path.exists("/proc/self/status")
pytestmark = pytest.mark.skipif(not GLIBC_LINUX, reason="glibc only")


def returned_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != USER_SETTING}
    command = [sys.executable, "-c", PROBE, mode]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_freed_blocks_return_to_the_system_only_with_the_threshold_fixed() -> None:
    assert returned_mib("fixed") > 7.5
    assert returned_mib("default") < 1.0  # glibc's own behaviour, which the fix exists for


def test_a_threshold_the_user_set_is_kept(monkeypatch) -> None:
    from loracl.engine.allocator import fix_mmap_threshold

    monkeypatch.setenv(USER_SETTING, "4194304")
    assert fix_mmap_threshold() is False
