"""MiniMindForCausalLM: layout, shapes, loss maths, KV-cache generation, fused vs reference ops."""

import pytest
import torch
import torch.nn.functional as F

from minimind_fast import ops
from minimind_fast.config import MiniMindConfig
from minimind_fast.constants import IGNORE_INDEX
from minimind_fast.model import MiniMindForCausalLM


def tiny(**overrides) -> MiniMindConfig:
    values = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    values.update(overrides)
    return MiniMindConfig(**values)


CONFIGS = {
    "dense": tiny(),
    "moe": tiny(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "qk_norm_top1": tiny(
        qk_norm=True, head_dim=32, use_moe=True, num_experts_per_tok=1, n_shared_experts=0
    ),
}


def test_parameter_names_follow_minimind():
    model = MiniMindForCausalLM(CONFIGS["moe"])
    names = set(model.state_dict())
    expected = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.1.mlp.shared_experts.0.up_proj.weight",
    }
    assert expected <= names
    assert not any("freqs" in name for name in names), "RoPE tables must be non-persistent"
    assert model.state_dict()["model.layers.1.mlp.gate.weight"].shape == (4, 64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dense = set(MiniMindForCausalLM(CONFIGS["dense"]).state_dict())
    assert {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    } <= dense
    qk = set(MiniMindForCausalLM(CONFIGS["qk_norm_top1"]).state_dict())
    assert {
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
    } <= qk


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_shapes(name):
    config = CONFIGS[name]
    model = MiniMindForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (3, 17))
    out = model(ids)
    assert out.logits.shape == (3, 17, config.vocab_size) and out.loss is None
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.ndim == 0 and out.aux_loss.ndim == 0
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    if config.use_moe:
        assert out.aux_loss.item() > 0


def test_loss_matches_hand_computation_with_ignore_index():
    config = CONFIGS["dense"]
    model = MiniMindForCausalLM(config)
    ids = torch.randint(3, config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, 5:9] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    logits = model(ids).logits
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1), reduction="none"
    )
    mask = labels[:, 1:].reshape(-1) != IGNORE_INDEX
    expected = per_token[mask].sum() / mask.sum()
    fused = model(ids, labels=labels).loss
    with_logits = model(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_logits.loss, expected, rtol=1e-5, atol=1e-6)
    assert with_logits.logits.shape == (2, 12, config.vocab_size)


@pytest.mark.parametrize("name", ["dense", "qk_norm_top1"])
def test_kv_cache_greedy_equals_no_cache(name):
    config = CONFIGS[name]
    model = MiniMindForCausalLM(config).eval()
    prompt = torch.randint(3, config.vocab_size, (2, 7))
    cached = model.generate(prompt, max_new_tokens=12, temperature=0, eos_token_id=-1)
    uncached = model.generate(
        prompt, max_new_tokens=12, temperature=0, eos_token_id=-1, use_cache=False
    )
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def test_kv_cache_logits_match_full_forward():
    config = CONFIGS["dense"]
    model = MiniMindForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, 10))
    full = model(ids).logits
    prefix = model(ids[:, :6], use_cache=True)
    step = model(ids[:, 6:], past_key_values=prefix.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 6:], rtol=1e-4, atol=1e-5)


def test_generation_stops_at_eos_and_pads():
    config = CONFIGS["dense"]
    model = MiniMindForCausalLM(config).eval()
    prompt = torch.randint(3, config.vocab_size, (2, 4))
    free = model.generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=-1)
    eos = int(free[0, 6])  # pretend row 0's third new token is EOS
    first = 4 + int((free[0, 4:] == eos).nonzero()[0])
    out = model.generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=eos)
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == config.pad_token_id).all()
    row1_eos = (free[1, 4:] == eos).nonzero()
    expected_len = 12 if len(row1_eos) == 0 else max(first, 4 + int(row1_eos[0])) + 1
    assert out.shape == (2, expected_len)


def test_sampling_is_reproducible_with_a_generator():
    config = CONFIGS["dense"]
    model = MiniMindForCausalLM(config).eval()
    prompt = torch.randint(3, config.vocab_size, (1, 4))
    runs = [
        model.generate(
            prompt,
            10,
            temperature=0.8,
            top_k=20,
            top_p=0.9,
            repetition_penalty=1.1,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_too_long_input_is_a_clear_error():
    model = MiniMindForCausalLM(CONFIGS["dense"])
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("name", ["dense", "qk_norm_top1"])
def test_triton_model_matches_reference_model(name):
    """Whole-model parity: same weights, Triton ops vs PyTorch reference ops."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with ops.use_backend(backend):
            out = model(ids, labels=labels, return_logits=True)
            fused_loss = model(ids, labels=labels).loss
            (out.loss + out.aux_loss).backward()
        results[backend] = (
            out.logits.detach(),
            out.loss.detach(),
            fused_loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )
    ref, fused = results["torch"], results["triton"]
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-5, atol=1e-6)
    for n in ref[3]:
        torch.testing.assert_close(
            fused[3][n], ref[3][n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
        )


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_compile_fullgraph_reference_path(name):
    config = CONFIGS[name]
    model = MiniMindForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 8))
    eager = model(ids, labels=ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, labels=ids)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
