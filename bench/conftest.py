"""pytest configuration of the benchmark suite: `pytest bench/ --benchmark-only`.

Collects bench/bench_*.py (function names test_*) whatever ini file pytest picked, so
pyproject's settings for tests/ need no change and module names never clash with tests/.
On CUDA every benchmark uses a timer that synchronises the device (see harness.py). The
environment (torch/Triton versions, GPU, size profile) goes into the JSON's machine_info.

Host heap: glibc hands the top of its heap back to the kernel once more than M_TRIM_THRESHOLD
is free there, and mmaps (then unmaps) every chunk above M_MMAP_THRESHOLD. Whether a benchmark's
temporaries land there depends on the allocation history, so some processes page-fault all of
them in again on every call and others never do (moe_route E64k8 forward+backward took a
thousand-odd page faults a call in some processes and none in others). The suite keeps freed
memory in the process, as tcmalloc / jemalloc do (PyTorch's CPU performance guide recommends
either), so that a number does not depend on which process it came from. It applies to every
implementation.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

if os.environ.get("MINIMIND_BENCH_THREADS"):  # e.g. 1 on a machine shared with other jobs
    import torch

    torch.set_num_threads(int(os.environ["MINIMIND_BENCH_THREADS"]))


def _keep_freed_host_memory() -> bool:
    """Raise glibc's trim and mmap thresholds (see the module docstring); False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        # 256 MiB where glibc takes it (2.36 does), else its documented maximum, 32 MiB on 64-bit
        mmap_set = (libc.mallopt(m_mmap_threshold, 256 << 20)
                    or libc.mallopt(m_mmap_threshold, 32 << 20))
        trim_set = libc.mallopt(m_trim_threshold, 1 << 30)
        return bool(mmap_set and trim_set)
    except (OSError, AttributeError):
        return False


HOST_HEAP_KEPT = _keep_freed_host_memory()

try:  # a larger cache than dynamo's default 8: reference functions are compiled per shape/mode
    import torch._dynamo

    for _name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, _name):
            setattr(torch._dynamo.config, _name, 64)
except Exception:  # noqa: BLE001
    pass


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; collect the rest here.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if harness.CUDA and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=harness.synced_timer))


def pytest_runtest_setup(item):
    """MINIMIND_BENCH_DEADLINE (epoch seconds, set by run_gpu.sh): later cases skip, so a
    time-boxed run still ends normally and writes its JSON."""
    deadline = os.environ.get("MINIMIND_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("time budget of this run is spent (MINIMIND_BENCH_DEADLINE)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["minimind_fast"] = dict(harness.environment(), host_heap_kept=HOST_HEAP_KEPT)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
