"""``keep_freed_memory``: a freed big CPU tensor's pages are reused, not mapped afresh (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
import torch
from hgdpo.training.allocator import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(64 << 18)  # 64 MiB, over glibc's largest mmap threshold
    del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_tensor()
print(min(faults_of_one_tensor() for _ in range(3)))
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_big_tensor_is_reused_instead_of_refaulted():
    pages = (64 << 20) // 4096
    assert _faults("off") > pages // 2  # glibc maps and unmaps it each time: every page faults again
    assert _faults("on") < pages // 100
