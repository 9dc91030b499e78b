"""Fused MoE routing: `moe_route(router_logits (T, E), top_k, ...)` -> MoERouting.

One pass over the router logits gives everything MiniMind's MoEGate and a grouped expert
computation need: top-k weights and expert ids, the statistics of the sequence- and token-level
aux losses, and the permutation that sorts the T*k (token, slot) pairs by expert. The op
`torch.ops.minimind_fast.moe_route` is C++ (csrc/moe_route.cpp: schema + checks;
csrc/moe_route_{forward,backward}_cpu.cpp: CPU kernels; csrc/cuda/: CUDA kernels), and so is its
autograd (csrc/moe_route_autograd.cpp), because a Python autograd wrapper measurably slows every
routing call at the benchmark's shapes (bench/bench_moe.py). This module registers the op's
fake (shape) implementation and is its Python entry point; ops/dispatch.py chooses the backend:

  - "ext" (what "auto" picks): the registered op (C++ on CPU, CUDA on GPU);
  - "torch": ops/moe_reference.py with plain autograd (the oracle).

If the extension `minimind_fast._C` does not import, the two op names are defined here with the
pure-PyTorch reference as their CompositeImplicitAutograd kernel (identical outputs, slower,
differentiable through the reference's own autograd) and ONE warning is issued at import. A
CUDA build of torch whose extension lacks the CUDA kernels gets the reference as the ops' CUDA
kernels under the C++ autograd. MINIMIND_FAST_REQUIRE_EXT=1 turns either fallback into an
ImportError, so a broken build cannot hide behind it (CI should set it;
tests/ops/test_moe_route.py also fails when the extension is missing unless
MINIMIND_FAST_REQUIRE_EXT=0).

Semantics (MiniMind's MoEGate): scores = softmax(logits) or sigmoid(logits) in fp32 (fp64 for
fp64 logits); the k best experts by logit, best first, ties -> lower expert id; weights are the
selected scores, divided by (their sum + 1e-20) whenever norm_topk_prob, for every top_k (as
MiniMind-3 and Qwen3-MoE do: a softmax top-1 weight is then exactly 1; MiniMind2's top-1 raw
probability is norm_topk_prob=False). seq_len splits the T rows into
B = T / seq_len sequences for the per-sequence statistics (0: one sequence).
"""

from __future__ import annotations

import importlib.machinery
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .. import compat
from . import dispatch, moe_reference

REQUIRE_EXT_ENV = "MINIMIND_FAST_REQUIRE_EXT"
SCORING_FUNCS = ("softmax", "sigmoid")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Must match TORCH_LIBRARY(minimind_fast, m) in csrc/moe_route.cpp.
FORWARD_SCHEMA = (
    'moe_route(Tensor router_logits, int top_k, bool norm_topk_prob, str scoring="softmax", '
    "int seq_len=0) -> (Tensor topk_weight, Tensor topk_idx, Tensor scores, Tensor prob_mean, "
    "Tensor seq_prob_mean, Tensor expert_counts, Tensor seq_expert_counts, Tensor sorted_pairs, "
    "Tensor expert_offsets, Tensor pair_positions)"
)
BACKWARD_SCHEMA = (
    "moe_route_backward(Tensor? grad_topk_weight, Tensor? grad_scores, Tensor? grad_prob_mean, "
    "Tensor? grad_seq_prob_mean, Tensor scores, Tensor topk_idx, bool norm_topk_prob, str scoring, "
    "int seq_len, ScalarType logits_dtype) -> Tensor"
)


class MoERouting(NamedTuple):
    """The outputs of moe_route. T tokens, E experts, k = top_k, B = T / seq_len sequences."""

    topk_weight: torch.Tensor  # (T, k) fp32: routing weights, best expert first
    topk_idx: torch.Tensor  # (T, k) int64: expert ids
    scores: torch.Tensor  # (T, E) fp32: softmax / sigmoid of the logits
    prob_mean: torch.Tensor  # (E,) fp32: mean score of each expert over all tokens
    seq_prob_mean: torch.Tensor  # (B, E) fp32: mean score of each expert per sequence
    expert_counts: torch.Tensor  # (E,) int64: (token, slot) pairs routed to each expert
    seq_expert_counts: torch.Tensor  # (B, E) int64: the same per sequence
    sorted_pairs: torch.Tensor  # (T*k,) int64: pair ids t*k + j sorted by expert (stable)
    expert_offsets: torch.Tensor  # (E+1,) int64: e owns sorted_pairs[offsets[e]:offsets[e+1]]
    pair_positions: torch.Tensor  # (T*k,) int64: inverse permutation of sorted_pairs


def _validate(router_logits: torch.Tensor, top_k: int, scoring: str, seq_len: int) -> None:
    shape = tuple(router_logits.shape)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be (tokens, experts), got shape {shape}")
    if router_logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"router_logits dtype {router_logits.dtype} is not supported; use "
            "float32, float64, bfloat16 or float16"
        )
    T, E = shape
    if E < 1 or T < 1:
        raise ValueError(f"router_logits shape {shape} needs at least one token and one expert")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}] (the number of experts)")
    if scoring not in SCORING_FUNCS:
        raise ValueError(f"scoring={scoring!r} must be 'softmax' or 'sigmoid'")
    if seq_len < 0:
        raise ValueError(
            f"seq_len={seq_len} must be >= 0 (the tokens per sequence; 0 means one "
            "sequence of all tokens)"
        )
    if seq_len and T % seq_len:
        raise ValueError(
            f"seq_len={seq_len} must divide the {T} tokens (tokens = batch * "
            "seq_len); 0 means one sequence"
        )


# ---- fallback kernels: the reference, registered under the op names where _C has none ----


def _reference_forward_kernel(router_logits, top_k, norm_topk_prob, scoring="softmax", seq_len=0):
    """CompositeImplicitAutograd kernel (no _C at all): the reference, differentiable."""
    _validate(router_logits, top_k, scoring, seq_len)
    outputs = moe_reference.moe_route_reference(
        router_logits, top_k, norm_topk_prob, scoring, seq_len
    )
    return tuple(out.contiguous() for out in outputs)


def _reference_forward_device_kernel(*args):
    """Device kernel under the C++ autograd (a _C without this device's kernels)."""
    with torch.no_grad():
        return _reference_forward_kernel(*args)


def _reference_backward_kernel(*args):
    with torch.no_grad():
        return moe_reference.moe_route_backward_reference(*args)


def _has_kernel(dispatch_key: str) -> bool:
    return compat.has_kernel_for("minimind_fast::moe_route", dispatch_key)


def _import_problem(error: ImportError, package_dir: Path) -> str:
    """Why `from minimind_fast import _C` failed, in words: never built (or removed), or built
    but not importable (then Python's own message says why)."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    if not any((package_dir / f"_C{suffix}").exists() for suffix in suffixes):
        return f"it is not built: {package_dir} holds no _C extension file"
    return f"it failed to import: {error}"


def _register_fallback() -> tuple[Optional[torch.library.Library], list[str]]:
    """Load minimind_fast._C; register the reference where it provides no kernel. Returns the
    library holding those registrations (None when none was needed) and their dispatch keys."""
    try:
        from .. import _C  # noqa: F401  (its static initialisers register the ops)

        problem, keys = None, []
        if torch.version.cuda is not None and not _has_kernel("CUDA"):
            problem, keys = "it was built without CUDA kernels", ["CUDA"]
    except ImportError as error:
        problem = _import_problem(error, Path(__file__).resolve().parent.parent)
        keys = ["CompositeImplicitAutograd"]
    if problem is None:
        return None, []
    if os.environ.get(REQUIRE_EXT_ENV, "0") == "1":
        raise ImportError(
            f"{REQUIRE_EXT_ENV}=1 but the extension minimind_fast._C is unusable "
            f"({problem}); build it with `pip install --no-build-isolation -e .`"
        )
    warnings.warn(
        f"minimind_fast._C is unusable ({problem}); moe_route falls back to its "
        "pure-PyTorch reference (same outputs, slower). Build it with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    library = torch.library.Library("minimind_fast", "FRAGMENT")
    if keys == ["CompositeImplicitAutograd"]:
        library.define(FORWARD_SCHEMA)
        library.define(BACKWARD_SCHEMA)
        library.impl("moe_route", _reference_forward_kernel, "CompositeImplicitAutograd")
        library.impl(
            "moe_route_backward",
            moe_reference.moe_route_backward_reference,
            "CompositeImplicitAutograd",
        )
    else:
        library.impl("moe_route", _reference_forward_device_kernel, "CUDA")
        library.impl("moe_route_backward", _reference_backward_kernel, "CUDA")
    return library, keys


# The library is kept alive: dropping it would unregister the kernels. FALLBACK_KEYS: where the
# reference runs instead of the extension ([] = nowhere; ["CUDA"]: the CPU kernels are ours).
_FALLBACK_LIBRARY, FALLBACK_KEYS = _register_fallback()
EXTENSION_LOADED = _FALLBACK_LIBRARY is None


def _moe_route_fake(router_logits, top_k, norm_topk_prob, scoring="softmax", seq_len=0):
    T, E = router_logits.shape
    B = T // (seq_len or T)
    real = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    new = router_logits.new_empty
    index = dict(dtype=torch.int64)
    return (
        new((T, top_k), dtype=real),
        new((T, top_k), **index),
        new((T, E), dtype=real),
        new((E,), dtype=real),
        new((B, E), dtype=real),
        new((E,), **index),
        new((B, E), **index),
        new((T * top_k,), **index),
        new((E + 1,), **index),
        new((T * top_k,), **index),
    )


def _moe_route_backward_fake(
    grad_topk_weight,
    grad_scores,
    grad_prob_mean,
    grad_seq_prob_mean,
    scores,
    topk_idx,
    norm_topk_prob,
    scoring,
    seq_len,
    logits_dtype,
):
    return scores.new_empty(scores.shape, dtype=logits_dtype)


# A CompositeImplicitAutograd op decomposes into the reference's aten ops: it takes no fake.
if not _has_kernel("CompositeImplicitAutograd"):
    torch.library.register_fake("minimind_fast::moe_route", _moe_route_fake)
    torch.library.register_fake("minimind_fast::moe_route_backward", _moe_route_backward_fake)


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    scoring: str = "softmax",
    seq_len: int = 0,
    backend: Optional[str] = None,
) -> MoERouting:
    """Route T tokens to k of E experts. router_logits: (T, E), T = batch * seq_len.

    Differentiable w.r.t. router_logits through topk_weight, scores, prob_mean and seq_prob_mean.
    backend: None (use_backend / MINIMIND_FAST_BACKEND / "auto"), "ext" or "torch".
    """
    _validate(router_logits, top_k, scoring, seq_len)
    if dispatch.choose_moe_route_backend(backend) == "torch":
        outputs = moe_reference.moe_route_reference(
            router_logits, top_k, norm_topk_prob, scoring, seq_len
        )
    else:
        outputs = torch.ops.minimind_fast.moe_route(
            router_logits.contiguous(), top_k, bool(norm_topk_prob), scoring, seq_len
        )
    return MoERouting(*outputs)
