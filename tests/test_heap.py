"""The training process keeps freed memory in its heap (fedmm.site.heap): counted page faults, not timings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedmm.data.synthetic import make_synthetic
from fedmm.models import ModelRecipe
from fedmm.site import training

# In a fresh process: allocate 20 MiB, touch it, free it, and again; print the page faults of the second touch.
_PROBE = """
import resource, sys
import torch
from fedmm.site.heap import keep_heap
print("kept" if (keep_heap() if sys.argv[1] == "keep" else False) else "default")
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(5 << 20)  # 20 MiB of float32
    block.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del block
print(faults)
"""

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's mallopt")


def _second_touch_faults(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env={**os.environ, **env}, timeout=120)
    state, faults = out.stdout.split()
    return state, int(faults)


@linux_glibc
def test_a_freed_block_is_reused_without_page_faults_once_the_heap_is_kept() -> None:
    state, faults = _second_touch_faults("default")
    # glibc's own thresholds: a 20 MiB block is a fresh mmap each time, every page faulted in again
    assert state == "default" and faults > 4000, faults
    state, faults = _second_touch_faults("keep")
    assert state == "kept" and faults < 100, faults


@linux_glibc
def test_the_heap_setting_can_be_turned_off() -> None:
    state, faults = _second_touch_faults("keep", FEDMM_KEEP_HEAP="0")
    assert state == "default" and faults > 4000, faults


def test_training_keeps_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(training, "keep_heap", lambda: bool(calls.append(1)))
    recipe = ModelRecipe("concat")
    data = recipe.prepare(make_synthetic(16, seed=0))
    training.train(recipe.build(data.schema, seed=0), data, epochs=1, batch_size=8, learning_rate=0.1, momentum=0.0, seed=0, dp=None)
    assert calls == [1]
