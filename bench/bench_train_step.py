"""End-to-end training step: useful tokens/s, FLOP rate and (GPU) MFU, for dense and MoE presets,
fused vs reference model, packed vs padded data, eager vs torch.compile.

A step is what pretrain runs per optimizer step without accumulation: forward with labels (the
fused lm_head + CE loss), loss + aux loss, backward, AdamW step, zero_grad; bf16 autocast on
CUDA, fp32 on CPU. "fused" is the default backend (Triton on CUDA); "reference" is the same
model under use_backend("torch"). On CPU both resolve to the PyTorch ops.

Batches are synthesised: "packed" rows are all real tokens; "padded" rows hold one document of
30-100% of the row (evenly spread: 35% padding on average, MiniMind's padded format) with pad ids
and labels -100 after it. Useful tokens are the non -100 shifted labels.

FLOPs per step = all tokens x (6 N + 6 L Hq D T): N are the matmul parameters (active ones for
MoE: top-k + shared experts; the tied embedding counted once, as the lm_head), and the causal
attention scores and values cost 2 x 2 L Hq D T/2 per token forward, x3 with the backward.
The useful FLOP rate counts only useful tokens. Each case also times a plain matmul right after
itself (fp32 on CPU, bf16 on CUDA: fraction_of_matmul), besides bench_baseline's matmul at the
start of the run. Targets: CPU FLOP rate >= 80% of the fp32 matmul measured in the same run
(issue 3, demo and minimind2-small); MoE step <= 1.25x (CPU) /
1.2x (GPU) the dense model with the same active parameters (issue 8; the `_dense` twins: the
MoE preset with one dense SwiGLU of (k + shared) x intermediate).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from harness import CUDA, DEVICE, FULL, matmul_tflops, measure, ours_or_skip, record_flops, record_memory
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
    Case("demo"), Case("demo", data="padded"), Case("demo", backend="reference"),
    Case("demo", mode="compiled", gpu=False),
    Case("demo_moe"), Case("demo_moe_dense"),
    Case("minimind2-small"), Case("minimind2-small", data="padded"),
    Case("minimind2-small", backend="reference", cpu=False),
    Case("minimind2-small", mode="compiled", cpu=False),
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
    if FULL:
        return 32, 512  # 16k tokens per step
    return (2, 256) if preset.startswith("minimind2") else (4, 256)


def make_batch(batch: int, seq_len: int, vocab: int, data: str, pad_id: int):
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    if data == "padded":
        lengths = torch.linspace(0.3 * seq_len, seq_len, batch).round().long()  # exactly ~35% pads
        pad = torch.arange(seq_len)[None, :] >= lengths[:, None]
        input_ids[pad] = pad_id
        labels[pad] = IGNORE_INDEX
    useful = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return input_ids.to(DEVICE), labels.to(DEVICE), useful


def step_flops_per_token(model, config, seq_len: int) -> tuple[float, dict]:
    from minimind_fast.model import count_parameters

    counts = count_parameters(model)
    matmul_params = counts["active"] - (0 if config.tie_word_embeddings else counts["embedding"])
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params + attention, counts


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_step(benchmark, case):
    from minimind_fast.model import MiniMindForCausalLM

    if FULL and not case.gpu:
        pytest.skip("CPU-profile case (the minimind2-small compiled rows cover it at full size)")
    if not FULL and not case.cpu:
        pytest.skip("full-size case: runs on GPU (or with MINIMIND_BENCH_SIZE=full)")
    if case.backend == "fused":
        ours_or_skip()
    benchmark.group = f"train_step {case.preset.removesuffix('_dense')}"
    config = build_config(case.preset)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  **({"fused": True} if CUDA else {}))
    runner = torch.compile(model, dynamic=False) if case.mode == "compiled" else model
    batch, seq_len = batch_shape(case.preset)
    input_ids, labels, useful = make_batch(batch, seq_len, config.vocab_size, case.data, config.pad_token_id)

    def context():
        stack = contextlib.ExitStack()
        if case.backend == "reference":
            stack.enter_context(ops.use_backend("torch"))
        if CUDA:
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        return stack

    def step():
        with context():
            out = runner(input_ids, labels=labels)
            loss = out.loss + out.aux_loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    median = measure(benchmark, step, warmup=2 if (CUDA or case.mode == "compiled") else 1,
                     min_rounds=3 if not CUDA else 5)
    per_token, counts = step_flops_per_token(model, config, seq_len)
    tokens = batch * seq_len
    record_flops(benchmark, per_token * tokens, median)
    matmul = matmul_tflops()
    benchmark.extra_info.update(matmul_tflops_adjacent=round(matmul, 5),
                                fraction_of_matmul=round(per_token * tokens / median / 1e12 / matmul, 4))
    benchmark.extra_info.update(
        preset=case.preset, backend=case.backend, data=case.data, mode=case.mode, batch=batch, seq_len=seq_len,
        tokens=tokens, useful_tokens=useful, useful_tokens_per_s=round(useful / median, 1),
        tokens_per_s=round(tokens / median, 1), useful_tflops=round(per_token * useful / median / 1e12, 5),
        params_total=counts["total"], params_active=counts["active"], flops_per_token=per_token,
        dtype="bf16-autocast" if CUDA else "float32")
    if CUDA:
        name = torch.cuda.get_device_name(0)
        peak = next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
        if peak:
            benchmark.extra_info.update(mfu=round(per_token * tokens / median / peak, 4), peak_flops=peak)
        record_memory(benchmark, step)
