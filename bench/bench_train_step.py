"""The training step: useful tokens/s, FLOP rate against a plain matmul, (GPU) MFU, and useful
tokens/s against a stand-in for MiniMind's trainer.

A step is what pretrain runs per optimizer step without accumulation: forward with labels (the
fused lm_head + cross-entropy), loss + aux loss, backward, gradient clipping and the fused AdamW
step (train.optim.build_optimizer / clip_and_step); bf16 autocast on CUDA, fp32 on CPU.
"fused" is the default backend (Triton on CUDA); "reference" is the same model under
use_backend("torch"); on CPU both resolve to the PyTorch ops. "compiled" is the model as the
trainer compiles it (train.compile.compile_model: fullgraph, static shapes); its first call's
time minus a compiled step's is recorded as compile_s (cold or warm inductor cache, as found).

Batches are synthesised: "packed" rows are all real tokens; "padded" rows hold one document of
30-100% of the row (evenly spread: 35% padding on average) with pad ids and labels -100 after it.
Useful tokens are the non -100 shifted labels.

FLOPs per step (`tflops`: the rate of the work done) = all tokens x (6 N' + 6 L Hq D T) + useful
tokens x 6 V H: N' are the decoder's matmul parameters (active ones for MoE: top-k + shared
experts), the causal attention scores and values cost 2 x 2 L Hq D T/2 per token forward, x3
with the backward, and the lm_head (V x H, tied or not) counts only where a target is scored,
since the fused loss skips the other rows: padded rows get no credit for work they skip.
`useful_tflops` counts the useful tokens only, each at the full per-token cost.
fraction_of_matmul is the step's FLOP rate over a plain matmul's (fp32 1024^3 on CPU, bf16
8192^3 on CUDA), each step timed against matmuls right beside it (harness.paired_ratio).

`test_minimind_trainer` compares this trainer with a stand-in for MiniMind's
trainer/train_pretrain.py on its model for --hidden_size 512 --num_hidden_layers 8 (MiniMind-3's
layout), rows of 512 tokens, batch 8, fp32, the bundled corpus with the bundled tokenizer:
- stand-in: this project's reference model, eager; MiniMind's rows (one document per row, BOS +
  text + EOS, padded); MiniMind's loop: the learning rate set every micro-step, full logits and
  cross-entropy, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW(model.parameters(), lr) as
  MiniMind builds it (not fused), a host sync (loss.item()) every log interval;
- ours: packed rows, the fused model and AdamW, compiled or not as `--use_compile auto` decides
  for that run (its eager step and the compile record decide; recorded as auto_compiles).
Useful tokens/s ours / stand-in is the target; tokens/s of all positions (the engine alone,
without packing's gain) and the padded rows' useful fraction are recorded beside it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
from harness import (
    CUDA,
    DEVICE,
    FULL,
    fraction_of_matmul,
    measure,
    ours_or_skip,
    paired_ratio,
    record_flops,
    record_memory,
)

from minimind_fast import ops
from minimind_fast.constants import IGNORE_INDEX

PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}  # dense, SXM datasheets


@dataclass(frozen=True)
class Case:
    preset: str
    backend: str = "fused"  # fused | reference
    data: str = "packed"  # packed | padded
    mode: str = "eager"  # eager | compiled
    cpu: bool = True  # part of the small (CPU) profile
    gpu: bool = True  # part of the full (GPU) profile

    @property
    def name(self) -> str:
        return f"{self.preset}-{self.backend}-{self.data}-{self.mode}"


CASES = [
    Case("demo"), Case("demo", mode="compiled"), Case("demo", data="padded"),
    Case("demo", backend="reference"),
    Case("demo_moe"), Case("demo_moe_dense"),
    Case("minimind2-small"), Case("minimind2-small", mode="compiled"),
    Case("minimind2-small", data="padded"),
    Case("minimind2-small", backend="reference", cpu=False),
    Case("minimind2-small", backend="reference", mode="compiled", cpu=False),
    Case("minimind2", cpu=False),
    Case("minimind2-moe", cpu=False), Case("minimind2-moe_dense", cpu=False),
    Case("minimind2-moe", backend="reference", cpu=False),
    Case("minimind3", cpu=False), Case("minimind3-moe", cpu=False),
]


def build_config(preset: str):
    """Presets, plus `demo_moe` (demo with the MoE FFN) and `<moe preset>_dense` twins."""
    from minimind_fast.config import get_preset

    dense_twin = preset.endswith("_dense")
    base = preset[: -len("_dense")] if dense_twin else preset
    config = get_preset("demo", use_moe=True) if base == "demo_moe" else get_preset(base)
    if dense_twin:
        width = (config.num_experts_per_tok + config.n_shared_experts) * config.intermediate_size
        config = config.replace(use_moe=False, intermediate_size=width)
    return config


def batch_shape(preset: str) -> tuple[int, int]:
    """(rows, tokens per row): the demo's training batch; 512 tokens of minimind2 on CPU."""
    if FULL:
        return 32, 512  # 16k tokens per step
    return (2, 256) if preset.startswith("minimind2") else (8, 256)


def make_batch(batch: int, seq_len: int, vocab: int, data: str, pad_id: int):
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    if data == "padded":
        lengths = torch.linspace(0.3 * seq_len, seq_len, batch).round().long()  # ~35% pads
        pad = torch.arange(seq_len)[None, :] >= lengths[:, None]
        input_ids[pad] = pad_id
        labels[pad] = IGNORE_INDEX
    useful = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return input_ids.to(DEVICE), labels.to(DEVICE), useful


def step_flops(model, config, seq_len: int, tokens: int, scored: int) -> tuple[float, float, dict]:
    """(FLOPs of a step, FLOPs per useful token, parameter counts). The decoder runs on every
    token; the lm_head and the loss only need the scored ones (the fused loss skips the rest),
    so only those are counted there: a padded batch gets no credit for the rows it skips."""
    from minimind_fast.model import count_parameters

    counts = count_parameters(model)
    matmul_params = counts["active"] - (0 if config.tie_word_embeddings else counts["embedding"])
    lm_head = 6 * config.vocab_size * config.hidden_size
    heads = config.num_attention_heads
    attention = 6 * config.num_hidden_layers * heads * config.head_dim * seq_len
    body = 6 * matmul_params - lm_head + attention
    return tokens * body + scored * lm_head, body + lm_head, counts


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def trainer_step(runner, optimizer, input_ids, labels, backend: str = "fused"):
    """pretrain.train_step for one micro-batch: forward, backward, clip_and_step."""
    from minimind_fast.train import optim

    scaler = torch.amp.GradScaler(DEVICE.type, enabled=False)

    def step():
        with ops.use_backend("torch") if backend == "reference" else contextlib.nullcontext():
            with autocast():
                out = runner(input_ids, labels=labels)
            (out.loss + out.aux_loss).backward()
        return optim.clip_and_step(optimizer, scaler, 1.0)[0]

    return step


def build_runner(model, mode: str):
    """The model as the trainer runs it: eager, or compiled as train.compile compiles it."""
    if mode == "eager":
        return model
    from minimind_fast.train.compile import compile_model

    return compile_model(model, None)


def timed_warmup(step, calls: int) -> list[float]:
    import time

    times = []
    for _ in range(calls):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_step(benchmark, case):
    from minimind_fast.model import MiniMindForCausalLM
    from minimind_fast.train import optim

    if FULL and not case.gpu:
        pytest.skip("CPU-profile case (the full-size rows cover it)")
    if not FULL and not case.cpu:
        pytest.skip("full-size case: runs on GPU (or with MINIMIND_BENCH_SIZE=full)")
    if case.backend == "fused":
        ours_or_skip()
    benchmark.group = f"train_step {case.preset.removesuffix('_dense')}"
    config = build_config(case.preset)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).to(DEVICE).train()
    optimizer = optim.build_optimizer(model, 1e-4, 0.1)
    batch, seq_len = batch_shape(case.preset)
    input_ids, labels, useful = make_batch(batch, seq_len, config.vocab_size, case.data,
                                           config.pad_token_id)
    step = trainer_step(build_runner(model, case.mode), optimizer, input_ids, labels, case.backend)
    if case.mode == "compiled":  # first call compiles: time it, then one more to settle
        first, second = timed_warmup(step, 2)
        benchmark.extra_info.update(compile_s=round(max(first - second, 0.0), 2))
    median = measure(benchmark, step, warmup=2 if CUDA else 1, min_rounds=3 if not CUDA else 5)
    tokens = batch * seq_len
    flops, per_token, counts = step_flops(model, config, seq_len, tokens, useful)
    record_flops(benchmark, flops, median)
    fraction = fraction_of_matmul(step, flops, pairs=10 if CUDA else 8)
    benchmark.extra_info.update(
        fraction_of_matmul=round(fraction, 4), preset=case.preset, backend=case.backend,
        data=case.data, mode=case.mode, batch=batch, seq_len=seq_len, tokens=tokens,
        useful_tokens=useful, useful_tokens_per_s=round(useful / median, 1),
        tokens_per_s=round(tokens / median, 1),
        useful_tflops=round(per_token * useful / median / 1e12, 5),
        params_total=counts["total"], params_active=counts["active"], flops_per_token=per_token,
        dtype="bf16-autocast" if CUDA else "float32")
    if CUDA:
        name = torch.cuda.get_device_name(0)
        peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
        if peak:
            benchmark.extra_info.update(mfu=round(flops / median / peak, 4),
                                        peak_flops=peak)
        record_memory(benchmark, step)


# ---- our trainer vs a stand-in for MiniMind's -------------------------------------------------

MINIMIND_SIZE = dict(hidden_size=512, num_hidden_layers=8)  # MiniMind's flags: MiniMind-3 layout
MINIMIND_SEQ_LEN, MINIMIND_BATCH, MINIMIND_LOG_INTERVAL = 512, 8, 100


def bundled_rows(seq_len: int, rows: int):
    """(packed rows, padded rows as MiniMind builds them, padded rows' useful fraction, packed
    rows in an epoch) from the bundled corpus and tokenizer (built on first use)."""
    import numpy as np

    from minimind_fast.corpus import build_default_corpus
    from minimind_fast.data import PackedDataset, PaddedDataset, build_token_cache
    from minimind_fast.data.tokenizer import default_tokenizer_path

    corpus, tokenizer = build_default_corpus(), default_tokenizer_path(6400)
    packed_cache = build_token_cache(corpus, tokenizer, progress=False)
    padded_cache = build_token_cache(corpus, tokenizer, progress=False, add_special_tokens="always",
                                     literal_special_tokens="keep")
    docs = np.arange(len(padded_cache.doc_offsets) - 1)
    packed = PackedDataset(packed_cache, np.arange(len(packed_cache.doc_offsets) - 1), seq_len)
    padded = PaddedDataset(padded_cache, docs, seq_len)
    lengths = np.minimum(np.diff(padded_cache.doc_offsets), seq_len)
    useful_fraction = float((lengths - 1).sum() / (len(lengths) * (seq_len - 1)))
    order = np.random.default_rng(0).permutation(len(padded))[:rows]  # any rows: same compute

    def stack(dataset, indices):
        items = [dataset[int(i)] for i in indices]
        return (torch.stack([it["input_ids"] for it in items]).to(DEVICE),
                torch.stack([it["labels"] for it in items]).to(DEVICE))

    return stack(packed, range(rows)), stack(padded, order), useful_fraction, len(packed)


def minimind_standin_step(model, input_ids, labels, total_steps: int, learning_rate=5e-4):
    """MiniMind's train_epoch for one micro-step with accumulation 1, on our reference model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)  # as MiniMind builds it
    counter = {"step": 0}

    def step():
        counter["step"] += 1
        lr = learning_rate / 10 + 0.5 * learning_rate * (
            1 + math.cos(math.pi * counter["step"] / total_steps))  # MiniMind's get_lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        with ops.use_backend("torch"), autocast():
            out = model(input_ids, labels=labels, return_logits=True)  # full logits, as MiniMind
            loss = out.loss + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if counter["step"] % MINIMIND_LOG_INTERVAL == 1:
            loss.item()  # MiniMind's log line: a host sync per log interval

    return step


def test_minimind_trainer(benchmark):
    from minimind_fast.config import get_preset
    from minimind_fast.model import MiniMindForCausalLM
    from minimind_fast.train import compile as autocompile
    from minimind_fast.train import optim

    ours_or_skip()
    benchmark.group = "trainer h512 L8 S512 B8"
    config = get_preset("minimind3", **MINIMIND_SIZE)
    seq_len, rows = MINIMIND_SEQ_LEN, MINIMIND_BATCH
    (ids, labels), (pad_ids, pad_labels), useful_fraction, epoch_rows = bundled_rows(seq_len, rows)
    torch.manual_seed(0)
    theirs = MiniMindForCausalLM(config).to(DEVICE).train()
    ours = MiniMindForCausalLM(config).to(DEVICE).train()
    ours.load_state_dict(theirs.state_dict())
    standin = minimind_standin_step(theirs, pad_ids, pad_labels, total_steps=10**4)
    eager = trainer_step(ours, optim.build_optimizer(ours, 5e-4, 0.1), ids, labels)
    standin_s, eager_s = timed_warmup(standin, 1)[0], timed_warmup(eager, 2)[1]
    # what --use_compile auto decides for this run: one epoch of the bundled corpus
    key = autocompile.signature(config, {"input_ids": ids, "labels": labels},
                                torch.bfloat16 if CUDA else torch.float32, DEVICE, 1, False)
    estimate = autocompile.estimate_for(autocompile.load_records(autocompile.records_path()), key)
    decision = autocompile.decide("auto", epoch_rows // rows, eager_s, estimate)
    mode = "compiled" if decision.compile else "eager"
    step = eager
    if decision.compile:
        step = trainer_step(build_runner(ours, "compiled"), optim.build_optimizer(ours, 5e-4, 0.1),
                            ids, labels)
        first, second = timed_warmup(step, 2)
        benchmark.extra_info.update(compile_s=round(max(first - second, 0.0), 2))
    median = measure(benchmark, step, warmup=0, min_rounds=2 if not CUDA else 5,
                     budget_s=None if CUDA else 0.0)
    standin_over_ours = paired_ratio(standin, step, pairs=10 if CUDA else 3)
    tokens = rows * seq_len
    useful_ours, useful_theirs = rows * (seq_len - 1), rows * (seq_len - 1) * useful_fraction
    flops, _, _ = step_flops(ours, config, seq_len, tokens, useful_ours)
    record_flops(benchmark, flops, median)
    benchmark.extra_info.update(
        mode=mode, auto_compiles=decision.compile, auto_reason=decision.reason,
        standin_eager_first_s=round(standin_s, 3), tokens=tokens, seq_len=seq_len, batch=rows,
        padded_useful_fraction=round(useful_fraction, 4),
        tokens_per_s_ratio=round(standin_over_ours, 4),
        useful_tokens_per_s_ratio=round(standin_over_ours * useful_ours / useful_theirs, 4),
        useful_tokens_per_s=round(useful_ours / median, 1),
        standin_useful_tokens_per_s=round(useful_theirs / (median * standin_over_ours), 1),
        dtype="bf16-autocast" if CUDA else "float32")
