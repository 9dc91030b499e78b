"""The MoE layer (minimind_fast/moe.py) vs MiniMind's literal per-expert loop
(tests/moe_oracle.py) on the same weights, with the experts grouped and split: output, aux loss
and every gradient, in fp32 and bf16; experts without tokens; torch.compile(fullgraph=True); DDP
without find_unused_parameters; a model step; MiniMind's state-dict keys.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close
from moe_oracle import minimind_moe_forward

from minimind_fast.config import MiniMindConfig, get_preset
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.moe import MoEFeedForward
from minimind_fast.ops import use_backend

# the two backends of ops.moe_experts: one grouped matmul per projection, or each expert on its
# slice of the rows
EXPERTS_BACKENDS = [pytest.param("grouped", id="grouped"), pytest.param("torch", id="split_loop")]


def config(**overrides) -> MiniMindConfig:
    values = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_moe=True,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
    )
    values.update(overrides)
    return MiniMindConfig(**values)


def run(layer, x, forward):
    """Forward + backward of a loss touching y and aux; returns (y, aux, grad_x, {param: grad})."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y, aux = forward(layer, x)
    (y.square().mean() + 10.0 * aux).backward()
    return y.detach(), aux.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def grouped(layer, x):
    return layer(x)


LAYER_CASES = {
    "top2_shared_seq_aux": dict(),
    "top2_token_aux": dict(seq_aux=False),
    # MiniMind-3's MoE: the renormalised top-1 weight is exactly 1
    "top1_no_shared": dict(num_experts_per_tok=1, n_shared_experts=0),
    # MiniMind2's top-1: the expert output weighted by its probability
    "top1_unnormalised": dict(num_experts_per_tok=1, norm_topk_prob=False),
    "sigmoid_unnormalised": dict(
        scoring_func="sigmoid", norm_topk_prob=False, num_experts_per_tok=3
    ),
    "eight_experts_top2": dict(n_routed_experts=8, n_shared_experts=2),
    # rows not 16-byte aligned: grouped_linear runs its per-group loop instead of grouped_mm
    "odd_hidden_size": dict(hidden_size=66, num_attention_heads=3, num_key_value_heads=1),
}


@pytest.mark.parametrize("experts_backend", EXPERTS_BACKENDS)
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_minimind_loop(name, experts_backend):
    torch.manual_seed(0)
    layer = MoEFeedForward(config(**LAYER_CASES[name])).train()
    x = torch.randn(3, 17, layer.config.hidden_size)
    with use_backend(experts_backend, op="moe_experts"):
        y, aux, gx, grads = run(layer, x, grouped)
    y_ref, aux_ref, gx_ref, grads_ref = run(layer, x, minimind_moe_forward)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    assert float(aux) > 0
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    for n, g in grads_ref.items():
        # MiniMind's loop leaves no gradient on an expert without tokens; ours is zero
        expected = torch.zeros_like(layer.get_parameter(n)) if g is None else g
        assert_close(grads[n], expected, rtol=1e-4, atol=1e-6, what=n)


@pytest.mark.parametrize("name", ["top2_shared_seq_aux", "sigmoid_unnormalised"])
def test_bf16_layer_grouped_and_split_match_minimind_loop(name):
    """bf16 weights and inputs: both expert backends against the loop, and against each other."""
    torch.manual_seed(0)
    layer = MoEFeedForward(config(**LAYER_CASES[name])).to(torch.bfloat16).train()
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    results = {}
    for backend in ("grouped", "torch"):
        with use_backend(backend, op="moe_experts"):
            results[backend] = run(layer, x, grouped)
    results["loop"] = run(layer, x, minimind_moe_forward)
    for backend in ("grouped", "torch"):
        y, aux, gx, grads = results[backend]
        y_ref, aux_ref, gx_ref, grads_ref = results["loop"]
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(aux, aux_ref, rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(gx, gx_ref, rtol=5e-2, atol=5e-3)
        for n, g in grads_ref.items():
            expected = torch.zeros_like(grads[n]) if g is None else g
            assert_close(grads[n], expected, rtol=5e-2, atol=5e-3, what=f"{backend} {n}")
    torch.testing.assert_close(results["grouped"][0], results["torch"][0], rtol=1e-2, atol=1e-2)


def test_eval_mode_has_no_aux_loss_and_same_output():
    torch.manual_seed(0)
    layer = MoEFeedForward(config()).eval()
    x = torch.randn(2, 9, 64)
    y, aux = layer(x)
    y_ref, aux_ref = minimind_moe_forward(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert float(aux) == 0.0 == float(aux_ref)


@pytest.mark.parametrize("experts_backend", EXPERTS_BACKENDS)
def test_expert_without_tokens_gets_a_zero_gradient(experts_backend):
    torch.manual_seed(0)
    layer = MoEFeedForward(config(n_routed_experts=4, num_experts_per_tok=1)).train()
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0  # every token prefers expert 0 when its features sum > 0
    x = torch.randn(2, 8, 64).abs()
    with use_backend(experts_backend, op="moe_experts"):
        y, aux = layer(x)
        (y.sum() + aux).backward()
    for e in range(1, 4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            grad = getattr(layer.experts[e], proj).weight.grad
            assert grad is not None and torch.count_nonzero(grad) == 0, f"expert {e} {proj}"
    assert torch.count_nonzero(layer.experts[0].up_proj.weight.grad) > 0


def test_compile_fullgraph_matches_eager():
    """On CPU, eager runs the split loop and the compiled graph the grouped experts."""
    torch.manual_seed(0)
    layer = MoEFeedForward(config()).train()
    x = torch.randn(2, 16, 64, requires_grad=True)
    y, aux = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum() + aux, x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_c, aux_c = compiled(x)
    (gx_c,) = torch.autograd.grad(y_c.square().sum() + aux_c, x)
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_c, aux)
    torch.testing.assert_close(gx_c, gx, rtol=1e-5, atol=1e-6)


_DDP_SCRIPT = textwrap.dedent("""
    import gc, os, sys, torch, torch.distributed as dist
    from minimind_fast.config import MiniMindConfig
    from minimind_fast.moe import MoEFeedForward
    from minimind_fast.ops import use_backend
    dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
    config = MiniMindConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, use_moe=True,
                            num_experts_per_tok=1)
    for experts_backend in ("grouped", "torch"):
        torch.manual_seed(0)
        layer = MoEFeedForward(config).train()
        with torch.no_grad():
            layer.gate.weight.zero_()
            layer.gate.weight[0] = 1.0  # experts 1..3 receive no token
        model = torch.nn.parallel.DistributedDataParallel(layer, find_unused_parameters=False)
        x = torch.randn(2, 8, 64).abs()
        for _ in range(3):  # DDP raises on the next step if a parameter missed its gradient
            with use_backend(experts_backend, op="moe_experts"):
                y, aux = model(x)
            (y.square().mean() + aux).backward()
        assert all(p.grad is not None for p in layer.parameters())
        del model, y, aux
        gc.collect()  # the reducer must go before the process group (gloo teardown)
    dist.destroy_process_group()
    print("ddp ok")
""")


def test_ddp_without_find_unused_parameters_when_an_expert_is_idle(tmp_path):
    """In a subprocess: DDP/gloo state stays out of the test process, and a hang is bounded."""
    result = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ddp ok" in result.stdout, result.stderr[-3000:]


def test_demo_moe_model_trains_a_step():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(get_preset("demo", use_moe=True)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.mlp.gate.weight" in changed
    assert "model.layers.3.mlp.experts.1.down_proj.weight" in changed
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)


def test_model_moe_grads_match_minimind_loop_layers(monkeypatch):
    """Whole model: swapping every MoE layer's forward for MiniMind's loop changes nothing."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config(num_hidden_layers=2)).train()
    ids = torch.randint(0, 97, (2, 12))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return out.loss.detach(), out.aux_loss.detach(), grads

    loss, aux, grads = loss_and_grads()
    monkeypatch.setattr(MoEFeedForward, "forward", minimind_moe_forward)
    loss_ref, aux_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-5, atol=1e-7)
    for n, g in grads_ref.items():
        expected = torch.zeros_like(model.get_parameter(n)) if g is None else g
        assert_close(grads[n], expected, rtol=1e-4, atol=1e-6, what=n)


@pytest.mark.parametrize("experts_backend", EXPERTS_BACKENDS)
def test_autocast_bf16_runs_experts_in_bf16(experts_backend):
    torch.manual_seed(0)
    layer = MoEFeedForward(config()).train()
    x = torch.randn(2, 8, 64)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast, use_backend(experts_backend, op="moe_experts"):
        y, aux = layer(x)
        y_loop, _ = minimind_moe_forward(layer, x)
    assert y.dtype == y_loop.dtype
    torch.testing.assert_close(y.float(), y_loop.float(), rtol=2e-2, atol=2e-2)
    (y.float().square().mean() + aux).backward()
    assert layer.experts[0].gate_proj.weight.grad.dtype == torch.float32


def test_state_dict_keys_are_minimind_s():
    """A state dict written with MiniMind's key names (and by earlier versions of this layer)
    loads with strict=True, and comes back with the same keys."""
    cfg = config(n_routed_experts=2, n_shared_experts=1)
    H, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"gate.weight": (2, H)}
    for group, count in (("experts", 2), ("shared_experts", 1)):
        for i in range(count):
            shapes.update(
                {
                    f"{group}.{i}.gate_proj.weight": (inter, H),
                    f"{group}.{i}.up_proj.weight": (inter, H),
                    f"{group}.{i}.down_proj.weight": (H, inter),
                }
            )
    old = {key: torch.randn(shape) for key, shape in shapes.items()}
    layer = MoEFeedForward(cfg)
    layer.load_state_dict(old, strict=True)
    state = layer.state_dict()
    assert sorted(state) == sorted(old)
    assert all(torch.equal(state[key], old[key]) for key in old)
