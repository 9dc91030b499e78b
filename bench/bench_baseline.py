"""Machine baselines measured in the same run as everything else: copy bandwidth and matmul rate.

Targets are stated against them: RMSNorm forward at >= 70% of the copy bandwidth of the same
bytes, routing within 2x of the bandwidth floor, the CPU training step's FLOP rate against a
plain fp32 matmul's (bench_train_step times that matmul itself, alternating with the step).
`copy[h512]`/`copy[h768]` copy exactly the RMSNorm input (same launch overhead and cache regime);
`copy[large]` is the device's streaming bandwidth (1 GiB on CUDA). Bytes count read + write, as
in the STREAM benchmark.
"""
import pytest
import torch
from harness import (
    CUDA,
    DEVICE,
    DTYPE,
    NORM_HIDDEN,
    NORM_ROWS,
    measure,
    record_bandwidth,
    record_flops,
    size,
)


@pytest.mark.parametrize("case", [f"h{h}" for h in NORM_HIDDEN] + ["large"])
def test_copy(benchmark, case):
    benchmark.group = "baseline copy"
    if case == "large":
        numel = size(16 * 2**20, 512 * 2**20)  # 64 MiB fp32 on CPU, 1 GiB bf16 on CUDA
        shape = (numel,)
    else:
        shape = (NORM_ROWS, int(case[1:]))
    src = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    median = measure(benchmark, lambda: dst.copy_(src))
    benchmark.extra_info.update(shape=list(shape), dtype=str(DTYPE))
    record_bandwidth(benchmark, 2 * src.numel() * src.element_size(), median)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul(benchmark, dtype):
    """A plain square matmul: the FLOP rate the training step is compared against."""
    benchmark.group = "baseline matmul"
    if dtype == "bf16" and not CUDA:
        pytest.skip("bf16 matmul is the GPU baseline; the CPU step runs in fp32")
    n = size(1024, 8192 if dtype == "bf16" else 4096)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=torch_dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=torch_dtype)
    out = torch.empty(n, n, device=DEVICE, dtype=torch_dtype)
    median = measure(benchmark, lambda: torch.mm(a, b, out=out))
    tf32 = bool(CUDA and torch.backends.cuda.matmul.allow_tf32)
    benchmark.extra_info.update(n=n, dtype=dtype, tf32=tf32)
    record_flops(benchmark, 2 * n**3, median)
