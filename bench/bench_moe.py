"""MoE routing op vs its pure-PyTorch reference, and the MoE layer vs MiniMind's per-expert loop.

Routing: `moe_route(router_logits (T, E), top_k, norm_topk_prob, scoring=...)` from the C++/CUDA
extension vs minimind_fast/ops/moe_reference.py, forward and forward+backward (the backward
reaches the router logits through the top-k weights and the aux-loss statistics), plus
MiniMind's own gate maths (softmax, top-k, renormalise, sequence-level aux loss; no permutation)
for scale, at T = 8192 (CPU) / 65536 (GPU) tokens in sequences of 512, for (E, k) in
{(4,1), (4,2), (8,2), (64,8)}. On CPU the "ours" forward+backward case also records
reference_ratio_interleaved: reference time / ours, timed in alternating blocks
(harness.interleaved_ratio) so that both sides of the ratio see the same machine. On GPU the
forward's bandwidth counts the logits read plus every output written. "ours" is skipped when
the extension is not built (the fallback is the reference).

Layer: minimind_fast.moe.MoEFeedForward ("ours": what the package ships, the experts' backend
chosen by ops/dispatch.py; "ours_grouped": the same with the grouped experts forced) vs
MiniMind's MOEFeedForward training loop (repeat_interleave, one boolean mask per expert,
weighted sum) re-implemented here over the same module's weights. FLOPs: tokens x (k + shared)
SwiGLU experts, 6 H I per token forward, x3 for fwd+bwd.
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

from minimind_fast.ops.moe_reference import moe_route_reference

from harness import (CUDA, DEVICE, DTYPE, interleaved_ratio, measure, record_bandwidth,
                     record_flops, record_memory, size)

ROUTE_T = size(8192, 65536)
SEQ_LEN = 512
ROUTE_CASES = [(4, 1), (4, 2), (8, 2), (64, 8)]


def route_op():
    """The extension's moe_route (skipped where only the pure-PyTorch fallback would run)."""
    # the module: the package attribute of the same name is the function
    route_module = importlib.import_module("minimind_fast.ops.moe_route")
    fallback = set(route_module.FALLBACK_KEYS)
    if "CompositeImplicitAutograd" in fallback or ("CUDA" if CUDA else "CPU") in fallback:
        pytest.skip(f"minimind_fast._C has no {DEVICE.type} kernel: moe_route would time its "
                    "pure-PyTorch fallback")
    return route_module.moe_route


def call_route(fn, logits, top_k):
    return fn(logits, top_k, True, scoring="softmax", seq_len=SEQ_LEN)


def minimind_gate(logits, top_k):
    """MiniMind's MoEGate maths from router logits (T, E): weights, indices, seq-level aux loss."""
    T, E = logits.shape
    scores = logits.float().softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)  # as call_route
    batch = T // SEQ_LEN
    counts = torch.zeros(batch, E, device=logits.device)
    ones = torch.ones(batch, SEQ_LEN * top_k, device=logits.device)
    counts.scatter_add_(1, topk_idx.view(batch, -1), ones)
    counts = counts.div(SEQ_LEN * top_k / E)
    aux = (counts * scores.view(batch, SEQ_LEN, E).mean(dim=1)).sum(dim=1).mean()
    return topk_weight, topk_idx, aux


def tensors_of(result):
    return [leaf for leaf in result if isinstance(leaf, torch.Tensor)]  # a MoERouting or a tuple


def route_fn(impl: str, top_k: int):
    """logits -> the outputs of one routing implementation."""
    if impl == "minimind_gate":
        return lambda logits: minimind_gate(logits, top_k)
    op = route_op() if impl == "ours" else moe_route_reference
    return lambda logits: call_route(op, logits, top_k)


def route_step(fn, logits: torch.Tensor):
    """One call of fn: forward only, or forward + backward when logits require grad."""
    if not logits.requires_grad:
        return lambda: fn(logits)

    def step():
        floats = [t for t in tensors_of(fn(logits)) if t.requires_grad]
        return torch.autograd.grad(floats, (logits,), [torch.ones_like(t) for t in floats])

    return step


@pytest.mark.parametrize("impl", ["ours", "reference", "minimind_gate"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("experts,top_k", ROUTE_CASES, ids=[f"E{e}k{k}" for e, k in ROUTE_CASES])
def test_moe_route(benchmark, experts, top_k, mode, impl):
    benchmark.group = f"moe_route E{experts}k{top_k} {mode}"
    fn = route_fn(impl, top_k)
    grad = mode == "fwdbwd"
    logits = torch.randn(ROUTE_T, experts, device=DEVICE, dtype=torch.float32, requires_grad=grad)
    with torch.no_grad():
        outputs = tensors_of(fn(logits))
    out_bytes = sum(t.numel() * t.element_size() for t in outputs)
    step = route_step(fn, logits)
    median = measure(benchmark, step)
    benchmark.extra_info.update(tokens=ROUTE_T, experts=experts, top_k=top_k, seq_len=SEQ_LEN,
                                output_bytes=out_bytes)
    record_bandwidth(benchmark, logits.numel() * logits.element_size() + out_bytes, median)
    record_memory(benchmark, step)
    if impl == "ours" and grad and not CUDA and benchmark.stats is not None:  # side by side
        reference_step = route_step(route_fn("reference", top_k), logits)
        reference_step()
        ratio = interleaved_ratio(reference_step, step)
        benchmark.extra_info["reference_ratio_interleaved"] = ratio


# ---------------------------------------------------------------------------- the MoE layer

LAYER_CASES = {  # name: (preset whose MoE layout is used, hidden size on the small profile)
    "minimind2-moe": ("minimind2-moe", 256),
    "minimind3-moe": ("minimind3-moe", 256),
}
LAYER_B, LAYER_T = size(4, 16), size(256, 1024)


def swiglu(expert, x):
    hidden = F.silu(F.linear(x, expert.gate_proj.weight)) * F.linear(x, expert.up_proj.weight)
    return F.linear(hidden, expert.down_proj.weight)


def minimind_moe_loop(module, config, x):
    """MiniMind's MOEFeedForward.forward in training mode, over `module`'s parameters."""
    B, T, H = x.shape
    k, E = config.num_experts_per_tok, config.n_routed_experts
    flat_x = x.reshape(-1, H)
    scores = F.linear(flat_x, module.gate.weight).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    if config.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.zeros(B, E, device=x.device)
    counts.scatter_add_(1, topk_idx.view(B, -1), torch.ones(B, T * k, device=x.device))
    counts = counts.div(T * k / E)
    aux = (counts * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * config.aux_loss_alpha
    repeated = flat_x.repeat_interleave(k, dim=0)
    flat_idx = topk_idx.view(-1)
    y = torch.empty_like(repeated)
    for i, expert in enumerate(module.experts):
        mask = flat_idx == i
        y[mask] = swiglu(expert, repeated[mask]).to(y.dtype)
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    y = y.view(B, T, H)
    for expert in module.shared_experts:
        y = y + swiglu(expert, x)
    return y, aux


@pytest.mark.parametrize("impl", ["ours", "ours_grouped", "minimind_loop"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("layout", list(LAYER_CASES))
def test_moe_layer(benchmark, layout, mode, impl):
    from minimind_fast import ops
    from minimind_fast.config import get_preset
    from minimind_fast.moe import MoEFeedForward

    preset, small_hidden = LAYER_CASES[layout]
    config = get_preset(preset, hidden_size=size(small_hidden, None))
    benchmark.group = f"moe_layer {layout} {mode}"
    module = MoEFeedForward(config).to(DEVICE).train()
    x = torch.randn(LAYER_B, LAYER_T, config.hidden_size, device=DEVICE)
    if impl == "minimind_loop":
        def forward():
            return minimind_moe_loop(module, config, x)
    else:
        experts = "grouped" if impl == "ours_grouped" else "auto"

        def forward():
            with ops.use_backend(experts, op="moe_experts"):
                return module(x)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if CUDA else contextlib.nullcontext
    if mode == "fwd":
        def step():
            with torch.no_grad(), amp():
                return forward()
    else:
        x.requires_grad_(True)
        params = [p for p in module.parameters() if p.requires_grad]

        def step():
            with amp():
                y, aux = forward()
                loss = y.float().square().mean() + aux
            return torch.autograd.grad(loss, [x] + params, allow_unused=True)
    median = measure(benchmark, step)
    tokens = LAYER_B * LAYER_T
    active = config.num_experts_per_tok + config.n_shared_experts
    per_token = 6 * config.hidden_size * config.intermediate_size * (1 if mode == "fwd" else 3)
    flops = tokens * active * per_token
    benchmark.extra_info.update(tokens=tokens, hidden=config.hidden_size,
                                experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                                shared=config.n_shared_experts,
                                dtype=str(DTYPE) if CUDA else "float32")
    record_flops(benchmark, flops, median)
    record_memory(benchmark, step)
