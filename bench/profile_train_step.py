"""Where the training step's time goes: a torch.profiler breakdown by part of the model.

    python bench/profile_train_step.py --preset minimind2-small --batch 2 --seq_len 256
    python bench/profile_train_step.py --preset demo --batch 8 --mode compiled

Runs the step bench_train_step times (forward, backward, clip, fused AdamW; fp32 on CPU) under
torch.profiler and prints a markdown table: matmuls (every aten mm/addmm, the lm_head's
included), attention (SDPA's kernels), norms, RoPE, SwiGLU, the loss (cross-entropy outside its
matmuls), the optimizer (clip + AdamW), the embedding, other ops, and what is left of the wall
time (Python and dispatch); then the data loader's time per batch on the bundled corpus.

Eager ops are attributed to the part of the model that ran them by profiler ranges opened around
those parts (RMSNorm, FeedForward, ops.apply_rotary, SDPA, the fused loss, the embedding), and
backward ops by the autograd sequence number of the forward op that created them. Compiled
graphs ignore those ranges: their generated kernels show as "compiled kernels". On a shared
machine an op that is descheduled mid-call looks long, so each (part, op, shapes) counts its
median duration times its number of calls.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train_step import build_config, build_runner, make_batch, trainer_step  # noqa: E402

MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
PREFIX = "part:"


def _scoped(part: str, fn):
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + part):
            return fn(*args, **kwargs)
    return wrapper


def open_ranges(model) -> None:
    """Profiler ranges around each part of the model (this process only)."""
    import torch.nn.functional as F

    from minimind_fast import layers, nn, ops

    nn.RMSNorm.forward = _scoped("norms", nn.RMSNorm.forward)
    nn.RMSNorm.add_forward = _scoped("norms", nn.RMSNorm.add_forward)
    layers.FeedForward.forward = _scoped("SwiGLU", layers.FeedForward.forward)
    ops.apply_rotary = _scoped("RoPE", ops.apply_rotary)
    ops.fused_linear_cross_entropy = _scoped("loss", ops.fused_linear_cross_entropy)
    F.scaled_dot_product_attention = _scoped("attention", F.scaled_dot_product_attention)
    embedding = model.model.embed_tokens
    embedding.forward = _scoped("embedding", embedding.forward)


def _part_of(event) -> str | None:
    while event is not None:
        if event.name.startswith(PREFIX):
            return event.name[len(PREFIX):]
        if event.name.startswith("minimind_fast::fused_linear_cross_entropy"):
            return "loss"
        event = event.cpu_parent
    return None


def _backward_node(event):
    while event is not None and not ("Backward" in event.name and event.sequence_nr >= 0):
        event = event.cpu_parent
    return event


def classify(events) -> dict[tuple[str, str, str], list[float]]:
    """(part, op, shapes) -> self times in µs of every call."""
    forward_part = {}
    for event in events:
        if event.sequence_nr >= 0 and "Backward" not in event.name:
            forward_part.setdefault(event.sequence_nr, _part_of(event))
    calls = collections.defaultdict(list)
    for event in events:
        if event.self_cpu_time_total <= 0 or event.name.startswith(PREFIX):
            continue
        if event.name in MATMULS:
            part = "matmuls"
        elif "scaled_dot_product" in event.name and event.name.startswith("aten::_"):
            part = "attention (SDPA kernels)"
        elif "CompiledFxGraph" in event.name:
            part = "compiled kernels"
        else:
            part = _part_of(event)
            if part is None:
                node = _backward_node(event)
                part = forward_part.get(node.sequence_nr) if node is not None else None
            part = part or "other"
        calls[(part, event.name, str(event.input_shapes))].append(event.self_cpu_time_total)
    return calls


def loader_seconds(batch: int, seq_len: int, batches: int = 50) -> float | None:
    """Seconds per batch of the trainer's loader over the bundled corpus (None if not built)."""
    import numpy as np

    from minimind_fast.corpus import default_corpus_name
    from minimind_fast.data import (
        PackedDataset,
        ResumableSampler,
        build_token_cache,
        make_dataloader,
    )
    from minimind_fast.data.tokenizer import default_tokenizer_path
    from minimind_fast.paths import default_cache_dir

    corpus = default_cache_dir() / default_corpus_name()
    if not corpus.is_file():
        return None
    cache = build_token_cache(corpus, default_tokenizer_path(6400), progress=False)

    dataset = PackedDataset(cache, np.arange(len(cache.doc_offsets) - 1), seq_len)
    loader = make_dataloader(dataset, batch, ResumableSampler(len(dataset), 0, 0, 0, 1))
    iterator = iter(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / batches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--data", choices=("packed", "padded"), default="packed")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-ups)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from minimind_fast.model import MiniMindForCausalLM
    from minimind_fast.train import optim

    config = build_config(args.preset)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).train()
    open_ranges(model)
    input_ids, labels, _ = make_batch(args.batch, args.seq_len, config.vocab_size, args.data,
                                      config.pad_token_id)
    step = trainer_step(build_runner(model, args.mode), optim.build_optimizer(model, 1e-4, 0.1),
                        input_ids, labels)
    optimizer_step = optim.clip_and_step
    optim.clip_and_step = _scoped("optimizer (clip + AdamW)", optimizer_step)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall_us = (time.perf_counter() - start) / args.steps * 1e6
    parts, ops_of = collections.Counter(), collections.defaultdict(collections.Counter)
    for (part, name, _), durations in classify(prof.events()).items():
        spent = statistics.median(durations) * len(durations) / args.steps
        parts[part] += spent
        ops_of[part][name.replace("aten::", "")] += spent
    step_us = max(wall_us, sum(parts.values()))
    parts["Python, dispatch (wall - ops)"] = step_us - sum(parts.values())
    print(f"{args.preset} {args.data} {args.mode}, batch {args.batch}x{args.seq_len}, "
          f"{args.threads} thread(s): {step_us / 1e3:.1f} ms per step (profiled)\n")
    print("| part | ms / step | % of step | top ops (% of step) |\n|---|---|---|---|")
    for part, spent in parts.most_common():
        top = ", ".join(f"{name} {100 * t / step_us:.1f}"
                        for name, t in ops_of[part].most_common(3))
        print(f"| {part} | {spent / 1e3:.1f} | {100 * spent / step_us:.1f} | {top} |")
    seconds = loader_seconds(args.batch, args.seq_len)
    if seconds is not None:
        print(f"\ndata loader (bundled corpus, packed rows): {seconds * 1e3:.3f} ms per batch = "
              f"{100 * seconds / (step_us / 1e6):.2f}% of the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
