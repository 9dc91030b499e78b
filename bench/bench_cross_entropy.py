"""Cross-entropy with ignore_index, and the fused lm_head + cross-entropy: ours vs eager reference
vs torch.compile(reference) (vs Liger on GPU), with peak memory.

Targets: cross-entropy V=6400, N=16k: fwd+bwd >= 2x eager, and no fp32 (N, V) buffer beyond
the logits (peak extra memory < N*V*4 bytes). Fused linear + CE at N=16k, V=6400, H=768: peak
memory of the loss step (fwd+bwd) <= 1/4 of the unfused path (the eager reference: logits =
hidden @ W.T, then CE) at <= 1.1x its time; the memory cut is also checked on CPU, where `ours`
is the chunked PyTorch path; where the size profile runs a smaller N (CPU CI),
test_fused_linear_cross_entropy_memory_n16384 still measures the memory at N=16k.
5% of the targets are ignore_index.
test_fused_linear_cross_entropy_60pct_ignored: the loss step of a supervised fine-tuning batch,
60% of whose targets (the prompt tokens) are ignore_index, which ours skips: ours against ours on
the same batch with every target kept (what the skipping saves), and against F.linear +
F.cross_entropy and its torch.compile, the unfused code a user would write. On CPU the ratios
are also timed side by side (harness.interleaved_ratio): none_ignored_ratio_interleaved (ours
with every target kept / ours) and torch_ratio_interleaved (F.linear + F.cross_entropy / ours).
Bytes for CE: read the logits (fwd), plus write their gradient (fwd+bwd). FLOPs for the fused
loss step: 2 N H V forward, 4 N H V backward (dhidden and dW).
"""
import pytest
import torch
import torch.nn.functional as F

from harness import (CUDA, DEVICE, DTYPE, compiled, grads_of, interleaved_ratio, liger_functional,
                     measure, ours_or_skip, peak_memory, record_bandwidth, record_flops,
                     record_memory, size)
from minimind_fast import ops
from minimind_fast.constants import IGNORE_INDEX
from minimind_fast.ops import reference

V = 6400
N_CE = size(2048, 16384)
N_FLCE, H_FLCE = size(2048, 16384), 768
N_MEMORY = 16384  # the fused linear CE memory target's N
N_SFT, H_SFT = size(1024, 16384), size(512, 768)
SFT_IGNORED = 0.6  # the fraction of a fine-tuning batch's targets that are prompt tokens


def make_targets(n):
    targets = torch.randint(0, V, (n,), device=DEVICE)
    targets[torch.rand(n, device=DEVICE) < 0.05] = IGNORE_INDEX
    return targets


@pytest.mark.parametrize("impl", ["ours", "eager", "compiled", "liger"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_cross_entropy(benchmark, mode, impl):
    benchmark.group = f"cross_entropy V{V} {mode}"
    grad = mode == "fwdbwd"
    if impl == "ours":
        ours_or_skip()
        fn = ops.cross_entropy
    elif impl == "eager":
        fn = reference.cross_entropy
    elif impl == "compiled":
        fn = compiled(reference.cross_entropy)
    else:
        liger = liger_functional()

        def fn(logits, targets):
            return liger.liger_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    logits = torch.randn(N_CE, V, device=DEVICE, dtype=DTYPE).requires_grad_(grad)
    targets = make_targets(N_CE)
    if not grad:
        def step():
            return fn(logits, targets)
    else:
        def step():
            return grads_of(fn(logits, targets), (logits,), None)
    median = measure(benchmark, step)
    unit = logits.numel() * logits.element_size()
    benchmark.extra_info.update(n=N_CE, vocab=V, dtype=str(DTYPE), fp32_nv_bytes=N_CE * V * 4)
    record_bandwidth(benchmark, (1 if not grad else 2) * unit, median)
    record_memory(benchmark, step)


@pytest.mark.parametrize("impl", ["ours", "unfused", "compiled", "liger"])
def test_fused_linear_cross_entropy(benchmark, impl):
    benchmark.group = f"fused_linear_cross_entropy H{H_FLCE} V{V} fwdbwd"
    if impl == "ours":
        ours_or_skip()
        fn = ops.fused_linear_cross_entropy
    elif impl == "unfused":
        fn = reference.fused_linear_cross_entropy
    elif impl == "compiled":
        fn = compiled(reference.fused_linear_cross_entropy)
    else:
        liger = liger_functional()

        def fn(hidden, weight, targets):
            return liger.liger_fused_linear_cross_entropy(hidden, weight, targets,
                                                          ignore_index=IGNORE_INDEX)
    hidden = torch.randn(N_FLCE, H_FLCE, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (0.02 * torch.randn(V, H_FLCE, device=DEVICE)).to(DTYPE).requires_grad_()
    targets = make_targets(N_FLCE)

    def step():
        return grads_of(fn(hidden, weight, targets), (hidden, weight), None)
    # A CPU call is 6 N H V FLOPs (tens of GFLOP at the small profile): few calls there.
    median = measure(benchmark, step, warmup=2 if CUDA else 1, min_rounds=3)
    benchmark.extra_info.update(n=N_FLCE, hidden=H_FLCE, vocab=V, dtype=str(DTYPE))
    record_flops(benchmark, 6 * N_FLCE * H_FLCE * V, median)
    record_memory(benchmark, step)


def test_fused_linear_cross_entropy_memory_n16384(benchmark):
    """Peak memory of the loss step, ours and unfused, at N=16384 H=768 V=6400 (one call each):
    the memory target's own shape whatever the size profile."""
    if N_FLCE == N_MEMORY:
        pytest.skip("test_fused_linear_cross_entropy already runs at N=16384")
    ours_or_skip()
    benchmark.group = f"fused_linear_cross_entropy memory N{N_MEMORY} H{H_FLCE} V{V}"
    hidden = torch.randn(N_MEMORY, H_FLCE, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (0.02 * torch.randn(V, H_FLCE, device=DEVICE)).to(DTYPE).requires_grad_()
    targets = make_targets(N_MEMORY)

    def step(fn):
        return lambda: grads_of(fn(hidden, weight, targets), (hidden, weight), None)
    ours, unfused = step(ops.fused_linear_cross_entropy), step(reference.fused_linear_cross_entropy)
    peaks = {"ours": peak_memory(ours), "unfused": peak_memory(unfused)}
    benchmark.pedantic(ours, rounds=1, iterations=1)  # one call of ours, timed for the record
    benchmark.extra_info.update(n=N_MEMORY, hidden=H_FLCE, vocab=V, dtype=str(DTYPE),
                                peak_mem_ours_bytes=peaks["ours"],
                                peak_mem_unfused_bytes=peaks["unfused"],
                                peak_mem_ratio=peaks["ours"] / peaks["unfused"])


def torch_linear_cross_entropy(hidden, weight, targets):
    """The unfused loss as a user writes it: fp32 logits, then F.cross_entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("impl", ["ours", "ours_none_ignored", "torch", "torch_compiled"])
def test_fused_linear_cross_entropy_60pct_ignored(benchmark, impl):
    benchmark.group = (f"fused_linear_cross_entropy {SFT_IGNORED:.0%} ignored N{N_SFT} H{H_SFT} "
                       f"V{V} fwdbwd")
    if impl.startswith("ours"):
        ours_or_skip()
    hidden = torch.randn(N_SFT, H_SFT, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (0.02 * torch.randn(V, H_SFT, device=DEVICE)).to(DTYPE).requires_grad_()
    every_target = torch.randint(0, V, (N_SFT,), device=DEVICE)
    targets = every_target.clone()
    targets[torch.randperm(N_SFT, device=DEVICE)[:round(SFT_IGNORED * N_SFT)]] = IGNORE_INDEX

    def step_of(fn, t):
        return lambda: grads_of(fn(hidden, weight, t), (hidden, weight), None)
    ours, unfused = ops.fused_linear_cross_entropy, torch_linear_cross_entropy
    fn = {"torch": unfused, "torch_compiled": compiled(unfused)}.get(impl, ours)
    step = step_of(fn, every_target if impl == "ours_none_ignored" else targets)
    measure(benchmark, step, warmup=2 if CUDA else 1, min_rounds=3)
    benchmark.extra_info.update(n=N_SFT, hidden=H_SFT, vocab=V, dtype=str(DTYPE),
                                ignored_fraction=0.0 if impl == "ours_none_ignored"
                                else SFT_IGNORED)
    record_memory(benchmark, step)
    if impl == "ours" and not CUDA and benchmark.stats is not None:  # side by side
        for key, slow in (("none_ignored_ratio_interleaved", step_of(ours, every_target)),
                          ("torch_ratio_interleaved", step_of(unfused, targets))):
            slow()
            benchmark.extra_info[key] = interleaved_ratio(slow, step)
