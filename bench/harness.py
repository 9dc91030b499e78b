"""Shared machinery of the benchmark suite: device and size profile, timing, peak memory, rates.

Follows pytest-benchmark's pedantic mode (https://pytest-benchmark.readthedocs.io): every case
is warmed up first (compilation, autotuning and allocator growth stay out of the numbers), then
timed for a fixed budget of seconds. On CUDA the timer synchronises the device at the start and
end of each round, and a round holds enough iterations (>= 1 ms) that the synchronisation and
Python's launch overhead are amortised; pytest-benchmark reports time per iteration.

Size profiles (MINIMIND_BENCH_SIZE): "full" (the sizes the kernel and MoE targets are stated
at; default on CUDA) and "small" (CI sizes for CPUs: bench/RESULTS.md says how long a run takes).
Rates put in `extra_info` are derived from the median wall time; on CUDA the GPU's own busy time
per call (torch.profiler's kernel/memcpy durations, no launch overhead) is added as gpu_kernel_s
with the rates on that basis (gbps_kernel, tflops_kernel). Peak memory is the extra memory a
case allocates above what was live before it ran: torch.cuda.max_memory_allocated on CUDA, and
on CPU the allocator's own events recorded by torch.profiler(profile_memory=True), replayed in
time order (every c10 CPU allocation and free, including those inside C++ ops).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROFILE = os.environ.get("MINIMIND_BENCH_SIZE") or ("full" if CUDA else "small")
if PROFILE not in ("small", "full"):
    raise ValueError(f"MINIMIND_BENCH_SIZE={PROFILE!r} must be 'small' or 'full'")
FULL = PROFILE == "full"
# Op benchmarks run in the dtype a training step feeds them: bf16 under CUDA autocast, fp32 on CPU.
DTYPE = torch.bfloat16 if CUDA else torch.float32
# Timed seconds per case (after warm-up); the CPU default keeps a CI run short.
BUDGET_S = float(os.environ.get("MINIMIND_BENCH_BUDGET", "0.4" if CUDA else "0.2"))
MIN_ROUND_S = 1e-3 if CUDA else 0.0
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def size(small, full):
    """The value for the active size profile."""
    return full if FULL else small


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def synced_timer() -> float:
    """pytest-benchmark timer for CUDA: a round starts and ends with the device idle."""
    torch.cuda.synchronize()
    return time.perf_counter()


def measure(benchmark, fn: Callable[[], object], *, budget_s: Optional[float] = None,
            min_rounds: int = 3, max_rounds: int = 500, warmup: int = 2) -> float:
    """Warm `fn` up, then time it with benchmark.pedantic; returns the median seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    iterations = max(1, math.ceil(MIN_ROUND_S / once)) if MIN_ROUND_S else 1
    budget = BUDGET_S if budget_s is None else budget_s
    rounds = int(min(max(budget / (once * iterations), min_rounds), max_rounds))
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations)  # warm already
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
        return once
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(median_s=median, size_profile=PROFILE, device=str(DEVICE.type))
    if CUDA:
        kernel = gpu_kernel_seconds(fn, calls=max(1, min(5, int(0.2 / once) or 1)))
        if kernel is not None:
            benchmark.extra_info["gpu_kernel_s"] = kernel
    return median


def interleaved_ratio(fn_slow: Callable[[], object], fn_fast: Callable[[], object],
                      budget_s: float = 1.0, block_s: float = 0.02, min_blocks: int = 6,
                      min_calls: int = 3, settle: bool = True) -> float:
    """median time of fn_slow / median time of fn_fast, timed in alternating blocks of calls (about
    block_s each, at least min_calls) for about budget_s: on a shared machine a load spike then
    slows both sides of the ratio, where two cases timed seconds apart can see different
    machines. With `settle`, the first call of every block is not counted: it runs in the caches
    the other function left (moe_route at T=8192 runs measurably slower there), and the ratio
    compares the two in their steady state; calls that take seconds need no settling."""
    def once(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    fns = (fn_slow, fn_fast)
    per_block = [max(min_calls, math.ceil(block_s / max(once(fn), 1e-7))) for fn in fns]
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    blocks = 0
    while blocks < min_blocks or time.perf_counter() - start < budget_s:
        index = blocks % 2
        if settle:
            once(fns[index])
        times[index].extend(once(fns[index]) for _ in range(per_block[index]))
        blocks += 1
    slow, fast = (sorted(t)[len(t) // 2] for t in times)
    return slow / fast


def matmul_baseline() -> tuple[Callable[[], object], float]:
    """(fn, flops): the plain square matmul the training step is compared against (fp32 1024^3
    on CPU, bf16 8192^3 on CUDA), as in bench_baseline.test_matmul."""
    n, dtype = (8192, torch.bfloat16) if CUDA else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    out = torch.empty(n, n, device=DEVICE, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def paired_ratio(fn_slow: Callable[[], object], fn_fast: Callable[[], object], pairs: int = 8,
                 budget_s: float = 0.0) -> float:
    """Median over pairs of (one call of fn_slow) / (calls of fn_fast taking about as long),
    the pairs' order alternating, for at least `pairs` pairs and about budget_s: each ratio is
    taken over adjacent seconds, so a load that drifts on a shared machine cancels within a
    pair, where medians of two long series still see it."""
    def once(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    repeats = max(1, round(once(fn_slow) / max(once(fn_fast), 1e-7)))

    def fast() -> float:
        return sum(once(fn_fast) for _ in range(repeats)) / repeats

    ratios: list[float] = []
    start = time.perf_counter()
    while len(ratios) < pairs or time.perf_counter() - start < budget_s:
        if len(ratios) % 2:
            slow_s, fast_s = once(fn_slow), fast()
        else:
            fast_s, slow_s = fast(), once(fn_slow)
        ratios.append(slow_s / fast_s)
    return sorted(ratios)[len(ratios) // 2]


def fraction_of_matmul(step: Callable[[], object], step_flops: float, pairs: int = 8) -> float:
    """The step's FLOP rate over the plain matmul's, each step timed against matmuls run right
    before or after it (paired_ratio), so that a load change on a shared machine moves both."""
    matmul, matmul_flops = matmul_baseline()
    matmul()
    return step_flops / matmul_flops / paired_ratio(step, matmul, pairs=pairs)


def gpu_kernel_seconds(fn: Callable[[], object], calls: int = 5) -> Optional[float]:
    """Device time of one call: the summed durations of the GPU activities (kernels, memcpy,
    memset) that torch.profiler records over `calls` calls, divided by `calls`. Unlike the wall
    time, it leaves out the host's launch overhead and idle gaps between kernels."""
    try:
        from torch.profiler import ProfilerActivity, profile

        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync()
        total_ns = sum(e.duration_ns() for e in prof.profiler.kineto_results.events()
                       if e.activity_type() in ("kernel", "gpu_memcpy", "gpu_memset"))
        return total_ns / calls / 1e9 if total_ns > 0 else None
    except Exception:  # noqa: BLE001  (a profiler problem must not lose the benchmark)
        return None


def peak_memory(fn: Callable[[], object]) -> int:
    """Bytes allocated by one call of `fn` above what was live before it (its transient peak)."""
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def record_memory(benchmark, fn: Callable[[], object]) -> int:
    peak = peak_memory(fn)
    benchmark.extra_info.update(peak_mem_bytes=peak, peak_mem_mib=round(peak / 2**20, 2),
                                peak_mem_method="cuda.max_memory_allocated" if CUDA
                                else "torch.profiler memory events")
    return peak


def record_bandwidth(benchmark, nbytes: float, seconds: float) -> None:
    benchmark.extra_info.update(bytes=int(nbytes), gbps=round(nbytes / seconds / 1e9, 3))
    kernel = benchmark.extra_info.get("gpu_kernel_s")
    if kernel:
        benchmark.extra_info["gbps_kernel"] = round(nbytes / kernel / 1e9, 3)


def record_flops(benchmark, flops: float, seconds: float) -> None:
    benchmark.extra_info.update(flops=float(flops), tflops=round(flops / seconds / 1e12, 5))
    kernel = benchmark.extra_info.get("gpu_kernel_s")
    if kernel:
        benchmark.extra_info["tflops_kernel"] = round(flops / kernel / 1e12, 5)


def ours_or_skip(device: torch.device = DEVICE) -> str:
    """The backend `ops` picks by default here; skips where that would be the Triton interpreter."""
    from minimind_fast.ops import choose_backend

    backend = choose_backend(device)
    if backend == "triton" and (device.type != "cuda" or INTERPRETED):
        pytest.skip("default backend is Triton under TRITON_INTERPRET=1: interpreter timings are "
                    "never reported as performance")
    return backend


def liger_functional():
    """liger_kernel.transformers.functional, or skip (Liger is a GPU-only comparison)."""
    if not CUDA:
        pytest.skip("Liger-Kernel is compared on GPU only")
    try:
        from liger_kernel.transformers import functional
    except Exception as error:  # noqa: BLE001  (ImportError, or a Triton/torch mismatch inside it)
        pytest.skip(f"Liger-Kernel not installed ({type(error).__name__})")
    return functional


def compiled(fn: Callable) -> Callable:
    """torch.compile of a reference function: default mode, static shapes, one graph per case."""
    return torch.compile(fn, dynamic=False)


def grads_of(outputs, inputs, grad_outputs):
    """fwd+bwd without accumulating into .grad (no extra read-modify-write in the numbers)."""
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


def environment() -> dict:
    """What a results record needs to say where the numbers came from."""
    info = {"torch": torch.__version__, "device": DEVICE.type, "size_profile": PROFILE,
            "threads": torch.get_num_threads(), "budget_s": BUDGET_S}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_sm_count=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    try:
        from minimind_fast.ops import choose_backend

        info["default_backend"] = choose_backend(DEVICE)
    except Exception as error:  # noqa: BLE001
        info["default_backend"] = f"unavailable: {error}"
    info["triton_interpret"] = INTERPRETED
    return info


# Sizes shared between files (the copy baseline must move the same bytes as the RMSNorm rows).
NORM_ROWS = size(4096, 16384)
NORM_HIDDEN = (512, 768)
