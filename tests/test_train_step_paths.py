"""Which kernels the CPU training step runs (bench/profile_train_step.py measures their cost):
grouped-query attention through SDPA's fused CPU kernel with K/V read in place (no repeated
copies, no materialised causal mask), and the optimizer the trainer builds is the fused AdamW."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from minimind_fast.config import MiniMindConfig
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import optim

GQA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
)


def _ops_of_a_step(model, **forward):
    ids = torch.randint(0, 64, (2, 16))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(ids, labels=ids, **forward)
        out.loss.backward()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("segmented", [False, True])
def test_gqa_attention_reads_kv_in_place_through_the_fused_kernel(segmented):
    model = MiniMindForCausalLM(MiniMindConfig(**GQA)).train()
    forward = {"segment_ids": torch.tensor([[0] * 6 + [1] * 10, [0] * 16])} if segmented else {}
    names = _ops_of_a_step(model, **forward)
    assert "aten::repeat_interleave" not in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    if not segmented:  # plain causal rows: is_causal, no (T, T) mask built
        assert "aten::tril" not in names and "aten::tril_" not in names


def test_trainer_optimizer_is_fused():
    model = MiniMindForCausalLM(MiniMindConfig(**GQA))
    optimizer = optim.build_optimizer(model, 1e-3, 0.1)
    assert all(group["fused"] for group in optimizer.param_groups)
    names = _ops_of_a_step(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optim.clip_and_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    assert "aten::_fused_adamw_" in {event.name for event in prof.events()}
    assert names  # the step above ran
