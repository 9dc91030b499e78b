"""MiniMind's own model flags build MiniMind's model: the layout MiniMind-3's trainer builds from
`MiniMindConfig(hidden_size=..., num_hidden_layers=..., use_moe=...)`, checked key by key against
a table written here from MiniMind-3's config rules (model/model_minimind.py):

    heads 8, KV heads 4, head_dim = hidden // 8, intermediate = 64 * ceil(hidden * pi / 64),
    rms_norm_eps 1e-6, rope_theta 1e6, q_norm/k_norm (head_dim,) in every attention, tied
    embeddings, vocab 6400; MoE: `mlp.gate` Linear(hidden, 4), 4 experts of the same width,
    top-1, no shared expert, router_aux_loss_coef 5e-4 on the token-level balance loss.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from pretrain_helpers import assets, run, tiny_flags  # noqa: F401 (assets is a fixture)

from minimind_fast.config import PRESETS, get_preset
from minimind_fast.model import MiniMindForCausalLM, count_parameters
from minimind_fast.train import cli, prepare

README = Path(__file__).resolve().parents[1] / "README.md"


def minimind_layout(hidden: int, layers: int, use_moe: bool, vocab: int = 6400) -> dict:
    """key -> shape of the state dict of MiniMind-3's MiniMindForCausalLM of that size."""
    heads, kv_heads, experts = 8, 4, 4
    head_dim, width = hidden // heads, 64 * math.ceil(hidden * math.pi / 64)
    table = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    ffn = {
        "gate_proj.weight": (width, hidden),
        "up_proj.weight": (width, hidden),
        "down_proj.weight": (hidden, width),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        table.update(
            {
                p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                p + "self_attn.q_norm.weight": (head_dim,),
                p + "self_attn.k_norm.weight": (head_dim,),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
        if use_moe:
            table[p + "mlp.gate.weight"] = (experts, hidden)
            for e in range(experts):
                table.update({f"{p}mlp.experts.{e}.{k}": v for k, v in ffn.items()})
        else:
            table.update({f"{p}mlp.{k}": v for k, v in ffn.items()})
    return table


def resolved_config(argv: list[str], device: str = "cpu"):
    """The flags and model config a fresh run resolves from `argv` (no data, no run directory)."""
    args, explicit = cli.parse_args(argv)
    args, _ = prepare.resolve_flags(args, explicit, None, None, torch.device(device))
    return args, prepare.model_config(args, None)


def meta_layout(config) -> dict:
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_minimind3_fields(config) -> None:
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 4)
    assert config.head_dim == config.hidden_size // 8
    assert config.intermediate_size == 64 * math.ceil(config.hidden_size * math.pi / 64)
    assert (config.rms_norm_eps, config.rope_theta, config.qk_norm) == (1e-6, 1e6, True)
    assert config.vocab_size == 6400 and config.tie_word_embeddings
    assert config.max_position_embeddings == 32768
    if config.use_moe:
        experts = (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts)
        assert experts == (4, 1, 0) and config.scoring_func == "softmax"
        assert (config.aux_loss_alpha, config.seq_aux, config.norm_topk_prob) == (5e-4, False, True)


@pytest.mark.parametrize(
    "argv, hidden, layers, use_moe",
    [
        (["--hidden_size", "512", "--num_hidden_layers", "8"], 512, 8, False),
        (["--hidden_size", "768", "--num_hidden_layers", "16"], 768, 16, False),
        (["--use_moe", "1"], 768, 8, True),  # MiniMind's trainer defaults: hidden 768, 8 layers
        (["--hidden_size", "512", "--use_moe", "1"], 512, 8, True),
    ],
)
def test_size_flags_without_a_preset_build_minimind3s_model(argv, hidden, layers, use_moe):
    args, config = resolved_config(argv)
    assert args.preset == ("minimind3-moe" if use_moe else "minimind3")
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    assert config.use_moe == use_moe
    check_minimind3_fields(config)
    assert meta_layout(config) == minimind_layout(hidden, layers, use_moe)
    # MiniMind-3's trainer defaults, not the demo's
    training = (args.learning_rate, args.batch_size, args.accumulation_steps, args.max_seq_len)
    assert training == (5e-4, 32, 8, 340)


@pytest.mark.parametrize("device, preset", [("cpu", "demo"), ("cuda", "minimind2-small")])
def test_no_size_flags_keep_the_demo_on_cpu_and_minimind2_small_on_a_gpu(device, preset):
    args, config = resolved_config([], device)
    assert args.preset == preset
    assert config == get_preset(preset)


def test_an_explicit_preset_wins_over_minimind_defaults():
    args, config = resolved_config(["--preset", "minimind2-small", "--num_hidden_layers", "4"])
    assert args.preset == "minimind2-small"
    layout = (config.num_key_value_heads, config.intermediate_size, config.num_hidden_layers)
    assert layout == (2, 1408, 4)


def trained_pth(assets, run_dir, hidden, layers, **flags):
    """The MiniMind weights file a 1-step run with MiniMind's size flags writes, loaded."""
    argv = tiny_flags(
        assets,
        run_dir,
        preset=None,
        hidden_size=hidden,
        num_hidden_layers=layers,
        vocab_size=None,
        max_steps=1,
        batch_size=1,
        max_seq_len=16,
        warmup_steps=None,
        **flags,
    )
    assert run(argv) == 0
    suffix = "_moe" if flags.get("use_moe") else ""
    return torch.load(run_dir / f"pretrain_{hidden}{suffix}.pth", weights_only=True)


@pytest.mark.parametrize("use_moe", [0, 1])
def test_the_pth_the_trainer_writes_loads_into_minimind3s_layout(assets, tmp_path, use_moe):
    """The written {save_weight}_{hidden}[_moe].pth holds exactly MiniMind's keys and shapes in
    fp16 (what `load_state_dict(strict=True)` needs), at a size that trains in seconds."""
    weights = trained_pth(assets, tmp_path / "run", 64, 2, use_moe=use_moe)
    assert {k: tuple(v.shape) for k, v in weights.items()} == minimind_layout(64, 2, use_moe)
    assert all(v.dtype == torch.float16 for v in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize("hidden, layers", [(512, 8), (768, 16)])
def test_the_pth_of_a_full_size_run_loads_into_minimind3s_layout(assets, tmp_path, hidden, layers):
    weights = trained_pth(assets, tmp_path / "run", hidden, layers)
    assert {k: tuple(v.shape) for k, v in weights.items()} == minimind_layout(hidden, layers, False)


@pytest.mark.parametrize("name, use_moe", [("minimind3", False), ("minimind3-moe", True)])
def test_minimind3_presets_are_minimind3s_default_config(name, use_moe):
    config = get_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.use_moe) == (768, 8, use_moe)
    check_minimind3_fields(config)
    assert (config.head_dim, config.intermediate_size) == (96, 2432)
    assert meta_layout(config) == minimind_layout(768, 8, use_moe)


def test_use_moe_on_minimind3_is_minimind3_moe():
    assert get_preset("minimind3", use_moe=True) == get_preset("minimind3-moe")
    assert get_preset("minimind3", hidden_size=512).intermediate_size == 1664  # pi rule, new hidden


def test_minimind3_moe_aux_loss_is_minimind3s_token_level_loss():
    """MiniMind-3's MOEFeedForward: load = one_hot(topk_idx, E).float().mean(0);
    aux = (load * scores.mean(0)).sum() * E * router_aux_loss_coef, scores the softmax router."""
    torch.manual_seed(0)
    config = get_preset("minimind3-moe", hidden_size=64, num_hidden_layers=1, vocab_size=97)
    moe = MiniMindForCausalLM(config).model.layers[0].mlp.train()
    x = torch.randn(3, 7, 64)
    _, aux = moe(x)
    scores = torch.softmax(x.reshape(-1, 64) @ moe.gate.weight.T, dim=-1)
    topk_idx = scores.topk(1, dim=-1).indices
    load = torch.nn.functional.one_hot(topk_idx, 4).float().mean(0)
    expected = (load * scores.mean(0)).sum() * 4 * 5e-4
    torch.testing.assert_close(aux, expected, rtol=1e-5, atol=1e-9)


# The parameter counts in the README's Presets table are the ones the code computes.
PARAMETERS = {
    "demo": (1_606_784, None),
    "minimind2-small": (25_829_888, None),
    "minimind2": (104_030_976, None),
    "minimind2-moe": (145_029_760, 91_945_600),
    "minimind3": (63_912_192, None),
    "minimind3-moe": (198_416_640, 63_936_768),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_match_the_readme(name):
    total, active = PARAMETERS[name]
    with torch.device("meta"):
        counts = count_parameters(MiniMindForCausalLM(get_preset(name)))
    assert counts["total"] == total and counts["active"] == (active or total)
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{name}` |"))
    assert f"{total / 1e6:.1f}M" in row, row
    if active:
        assert f"{active / 1e6:.1f}M active" in row, row
    if name != "demo":  # which MiniMind version the preset reproduces
        version = "MiniMind-3" if name.startswith("minimind3") else "MiniMind2"
        assert re.search(rf"\b{version}\b", row), row
