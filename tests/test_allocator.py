"""glibc malloc tuning for CPU training (cxrdebias.training.allocator)."""

import json
import platform
import subprocess
import sys

import pytest

from cxrdebias.training import allocator
from cxrdebias.training.provenance import environment

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A training step's pattern: allocate, touch and free the same large tensors again and again
# (40, 16, 4 and 40 MiB here); print the minor page faults of 10 such steps after 8 warm-up
# steps (with 3 the kept heap had not always settled: 16% faults once). With glibc's default
# thresholds most of those pages are handed back to the system on free and fault in (zeroed by
# the kernel) again; kept, the same pages are reused.
_PROBE = """
import json, resource, sys, torch
if sys.argv[1] == "tuned":
    from cxrdebias.training import allocator
    assert allocator.keep_freed_memory()
torch.set_num_threads(1)
def step():
    ts = [torch.empty(n).fill_(1.0) for n in (10 << 20, 4 << 20, 1 << 20, 10 << 20)]
    del ts
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES = 10 * 100 * 1024 * 1024 // 4096  # 256,000: every page of every step


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


@pytest.fixture
def fresh(monkeypatch):
    """Each test starts as if nothing had been applied in this process."""
    monkeypatch.setattr(allocator, "_applied", None)


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning only exists for glibc")
def test_kept_memory_removes_most_page_faults_of_a_training_steps_allocations():
    default, tuned = _faults("default"), _faults("tuned")
    assert default >= 0.5 * PAGES  # measured: ≈ 0.85 (glibc 2.36)
    assert tuned <= 0.1 * PAGES  # measured: 0 in 8 of 8 runs


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning only exists for glibc")
def test_keep_freed_memory_reports_what_it_set(fresh):
    assert allocator.applied() is None
    assert allocator.keep_freed_memory(1 << 28) is True
    assert allocator.applied() == 1 << 28
    assert environment()["malloc_threshold"] == 1 << 28
    assert allocator.keep_freed_memory(1 << 28) is True  # again: a no-op
    assert allocator.keep_freed_memory() is True
    assert allocator.applied() == allocator.DEFAULT_THRESHOLD


def test_without_glibc_nothing_is_changed(fresh, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert allocator.keep_freed_memory() is False
    assert allocator.applied() is None


@pytest.mark.parametrize("bad", [0, -1, 1 << 31])
def test_threshold_must_fit_mallopts_int(bad, fresh):
    with pytest.raises(ValueError, match="below 2 GiB"):
        allocator.keep_freed_memory(bad)


def test_environment_names_the_cpu_and_its_bf16_support():
    env = environment()
    assert isinstance(env["cpu_native_bf16"], bool)
    if platform.system() == "Linux":
        assert env["cpu_model"]


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_tunes_the_allocator_on_the_cpu_unless_told_not_to(keep, monkeypatch):
    from tests.test_train import _trainer

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda *a, **k: calls.append(a) or True)
    tr = _trainer(None, epochs=1, keep_freed_memory=keep)
    assert tr.device.type == "cpu"
    assert calls == ([()] if keep else [])
