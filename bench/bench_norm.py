"""RMSNorm and fused residual-add + RMSNorm: ours vs eager reference vs torch.compile(reference)
(vs Liger-Kernel on GPU when installed), forward and forward+backward.

Targets (GPU, hidden 512 and 768, 16k rows, bf16): fwd+bwd >= 1.5x eager and not
slower than compile; forward >= 70% of the copy bandwidth of the same bytes (bench_baseline's
copy[hH]). Bytes are the minimum a fused kernel must move: rms_norm fwd reads x and writes y
(2 N H s), fwd+bwd adds reading x and dy and writing dx (5 N H s); add_rms_norm fwd reads x and
the residual and writes both outputs (4 N H s), fwd+bwd adds reading two upstream gradients and
the summed residual and writing one gradient (8 N H s). Weights and rstd are negligible.
"""
import pytest
import torch

from harness import (DEVICE, DTYPE, NORM_HIDDEN, NORM_ROWS, compiled, grads_of, liger_functional,
                     measure, ours_or_skip, record_bandwidth, record_memory)
from minimind_fast import ops
from minimind_fast.ops import reference

EPS = 1e-5
IMPLS = ["ours", "eager", "compiled", "liger"]
MODES = ["fwd", "fwdbwd"]


def rms_norm_impl(name):
    if name == "ours":
        ours_or_skip()
        return lambda x, w: ops.rms_norm(x, w, EPS)
    if name == "eager":
        return lambda x, w: reference.rms_norm(x, w, EPS)
    if name == "compiled":
        fn = compiled(reference.rms_norm)
        return lambda x, w: fn(x, w, EPS)
    liger = liger_functional()
    return lambda x, w: liger.liger_rms_norm(x, w, EPS)


def add_rms_norm_impl(name):
    if name == "ours":
        ours_or_skip()
        return lambda x, r, w: ops.add_rms_norm(x, r, w, EPS)
    if name == "eager":
        return lambda x, r, w: reference.add_rms_norm(x, r, w, EPS)
    if name == "compiled":
        fn = compiled(reference.add_rms_norm)
        return lambda x, r, w: fn(x, r, w, EPS)
    liger = liger_functional()
    fused = getattr(liger, "liger_fused_add_rms_norm", None)
    if fused is None:
        pytest.skip("this Liger-Kernel has no fused add + RMSNorm")
    return lambda x, r, w: tuple(fused(x, r, w, EPS))  # (normed, residual + x), like ours


def inputs(hidden, mode, count):
    grad = mode == "fwdbwd"
    tensors = [torch.randn(NORM_ROWS, hidden, device=DEVICE, dtype=DTYPE, requires_grad=grad)
               for _ in range(count)]
    weight = (1.0 + 0.1 * torch.randn(hidden, device=DEVICE)).to(DTYPE).requires_grad_(grad)
    return tensors, weight


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", NORM_HIDDEN, ids=lambda h: f"h{h}")
def test_rms_norm(benchmark, hidden, mode, impl):
    benchmark.group = f"rms_norm h{hidden} {mode}"
    fn = rms_norm_impl(impl)
    (x,), w = inputs(hidden, mode, 1)
    if mode == "fwd":
        def step():
            return fn(x, w)
    else:
        dy = torch.randn_like(x)

        def step():
            return grads_of(fn(x, w), (x, w), dy)
    median = measure(benchmark, step)
    unit = x.numel() * x.element_size()
    benchmark.extra_info.update(rows=NORM_ROWS, hidden=hidden, dtype=str(DTYPE))
    record_bandwidth(benchmark, (2 if mode == "fwd" else 5) * unit, median)
    record_memory(benchmark, step)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", NORM_HIDDEN, ids=lambda h: f"h{h}")
def test_add_rms_norm(benchmark, hidden, mode, impl):
    benchmark.group = f"add_rms_norm h{hidden} {mode}"
    fn = add_rms_norm_impl(impl)
    (x, residual), w = inputs(hidden, mode, 2)
    if mode == "fwd":
        def step():
            return fn(x, residual, w)
    else:
        d_normed, d_residual = torch.randn_like(x), torch.randn_like(x)

        def step():
            normed, updated = fn(x, residual, w)
            return grads_of((normed, updated), (x, residual, w), (d_normed, d_residual))
    median = measure(benchmark, step)
    unit = x.numel() * x.element_size()
    benchmark.extra_info.update(rows=NORM_ROWS, hidden=hidden, dtype=str(DTYPE))
    record_bandwidth(benchmark, (4 if mode == "fwd" else 8) * unit, median)
    record_memory(benchmark, step)
