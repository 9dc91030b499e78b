"""patch_hf_model: tiny random transformers models give the same logits, loss and gradients on our
ops, with the lm_head and the loss fused (no full logits) whenever labels are given."""

import copy

import pytest
import torch

import minimind_fast.ops as ops
from minimind_fast.interop import causal_lm_loss, patch_hf_model
from minimind_fast.layers import RMSNorm

transformers = pytest.importorskip(
    "transformers", reason="the HF tests need transformers: pip install transformers"
)

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
MODELS = {  # model_type: (config class, extra fields)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict()),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_hf_model(model_type: str):
    config_class, extra = MODELS[model_type]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so that swapping them is visible
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def op_calls(monkeypatch):
    """Count calls of our ops (patched where the patched model looks them up at call time)."""
    calls = {"rms_norm": 0, "apply_rotary": 0, "cross_entropy": 0, "fused_linear_cross_entropy": 0}
    for name in calls:
        original = getattr(ops, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counting)
    return calls


def forward_backward(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return None if out.logits is None else out.logits.detach(), out.loss.detach(), grads


def assert_same_grads(got: dict, expected: dict, model) -> None:
    assert got.keys() == expected.keys() and len(got) == len(list(model.parameters()))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", list(MODELS))
def test_logits_loss_and_grads_match(model_type, op_calls):
    reference = tiny_hf_model(model_type)
    patched = patch_hf_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (3, 37))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored targets
    expected = forward_backward(reference, ids, labels)
    assert not any(op_calls.values())  # the unpatched model: HF's code
    got = forward_backward(patched, ids, labels, skip_logits=False)
    layers = COMMON["num_hidden_layers"]
    norms_per_layer = 4 if model_type.startswith("qwen3") else 2
    assert op_calls == {
        "rms_norm": layers * norms_per_layer + 1,
        "apply_rotary": layers,
        "cross_entropy": 0,
        "fused_linear_cross_entropy": 1,
    }
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    assert_same_grads(got[2], expected[2], reference)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mixtral"])
def test_fused_loss_builds_no_logits_in_training(model_type, op_calls):
    """Training with labels: the loss is the fused op's and logits are None unless asked for;
    eval mode returns them. A MoE model's router aux loss still joins the loss (HF's code)."""
    kwargs = {"output_router_logits": True} if model_type == "mixtral" else {}
    reference = tiny_hf_model(model_type)
    patched = patch_hf_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, 11))
    labels = ids.masked_fill(torch.rand(2, 11) < 0.2, -100)
    expected = forward_backward(reference, ids, labels, **kwargs)
    got = forward_backward(patched, ids, labels, **kwargs)
    assert got[0] is None and op_calls["fused_linear_cross_entropy"] == 1
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    assert_same_grads(got[2], expected[2], reference)
    reference.eval()
    patched.eval()
    with torch.no_grad():
        out, ref = patched(ids, labels=labels, **kwargs), reference(ids, labels=labels, **kwargs)
        as_tuple = patched(ids, labels=labels, return_dict=False, **kwargs)
        ref_tuple = reference(ids, labels=labels, return_dict=False, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(ref_tuple)
    for ours, theirs in zip(as_tuple, ref_tuple):
        if torch.is_tensor(theirs):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fused_loss_keeps_the_loss_contract():
    """num_items_in_batch and shift_labels through the fused loss, as transformers' loss."""
    reference = tiny_hf_model("qwen3")
    patched = patch_hf_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.masked_fill(torch.rand(2, 9) < 0.3, -100)
    for kwargs in (
        {"num_items_in_batch": torch.tensor(23)},
        {"shift_labels": torch.randint(0, VOCAB, (2, 9))},
    ):
        expected = forward_backward(reference, ids, labels, **kwargs)
        got = forward_backward(patched, ids, labels, **kwargs)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
        assert_same_grads(got[2], expected[2], reference)


def test_fused_loss_with_a_biased_lm_head():
    reference = tiny_hf_model("llama")
    head = torch.nn.Linear(COMMON["hidden_size"], VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(reference.lm_head.weight)
    reference.lm_head = head
    patched = patch_hf_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = forward_backward(reference, ids, ids)
    got = forward_backward(patched, ids, ids)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    assert_same_grads(got[2], expected[2], reference)
    assert "lm_head.bias" in got[2]


def test_modules_swapped_and_weights_shared():
    model = tiny_hf_model("qwen3")
    attention = model.model.layers[0].self_attn
    q_norm_weight = attention.q_norm.weight
    patch_hf_model(model)
    assert isinstance(attention.q_norm, RMSNorm) and attention.q_norm.weight is q_norm_weight
    assert attention.q_norm.eps == 1e-6
    assert not any(
        type(m).__name__.endswith("RMSNorm") and not isinstance(m, RMSNorm) for m in model.modules()
    )
    assert patch_hf_model(model) is model  # idempotent


def test_other_models_and_the_modeling_module_untouched(op_calls):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    patched, untouched = tiny_hf_model("llama"), tiny_hf_model("llama")
    patch_hf_model(patched)
    assert modeling_llama.apply_rotary_pos_emb is original
    untouched(torch.randint(0, VOCAB, (1, 8)))
    assert op_calls["apply_rotary"] == 0
    patched(torch.randint(0, VOCAB, (1, 8)))
    assert op_calls["apply_rotary"] == COMMON["num_hidden_layers"]


def test_per_row_positions_fall_back_to_hf(op_calls):
    reference = tiny_hf_model("llama")
    patched = patch_hf_model(copy.deepcopy(reference))
    ids = torch.randint(0, VOCAB, (2, 12))
    for positions, ours in (
        (torch.stack([torch.arange(12), torch.arange(12) + 5]), False),  # rows differ
        (torch.arange(12).expand(2, 12), True),
    ):  # rows equal: our op
        op_calls["apply_rotary"] = 0
        with torch.no_grad():
            expected = reference(ids, position_ids=positions).logits
            got = patched(ids, position_ids=positions).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (op_calls["apply_rotary"] > 0) is ours


def test_greedy_generation_with_cache_matches():
    reference = tiny_hf_model("qwen3")
    patched = patch_hf_model(copy.deepcopy(reference))
    prompt = torch.randint(0, VOCAB, (2, 6))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert torch.equal(patched.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


def test_causal_lm_loss_matches_transformers_contract():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 9, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[1, 3:] = -100
    for target, kwargs in (
        (labels, {}),
        (labels, {"num_items_in_batch": torch.tensor(11)}),
        (labels, {"shift_labels": torch.randint(0, VOCAB, (2, 9))}),
        (labels.masked_fill(labels == -100, 7), {"ignore_index": 7}),
    ):
        torch.testing.assert_close(
            causal_lm_loss(logits, target, VOCAB, **kwargs),
            ForCausalLMLoss(logits, target, VOCAB, **kwargs),
            rtol=1e-6,
            atol=1e-6,
        )
    all_ignored = torch.full_like(labels, -100)
    assert causal_lm_loss(logits, all_ignored, VOCAB).item() == 0.0  # HF gives NaN here


def test_deepcopy_of_a_patched_model_is_independent(op_calls):
    model = patch_hf_model(tiny_hf_model("llama"))
    clone = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        clone.model.layers[0].self_attn.q_proj.weight.add_(1.0)
        assert not torch.allclose(clone(ids).logits, model(ids).logits)
    assert clone.model.layers[0].self_attn.forward.__self__ is clone.model.layers[0].self_attn


def test_refuses_unsupported_models():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        patch_hf_model(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    )
    with pytest.raises(ValueError, match="gpt2"):
        patch_hf_model(gpt2)
