"""Config validation and presets."""

import pytest
import torch

from minimind_fast.config import PRESETS, MiniMindConfig, default_intermediate_size, get_preset
from minimind_fast.model import MiniMindForCausalLM, count_parameters
from minimind_fast.ops import moe_route


def test_minimind2_defaults():
    config = MiniMindConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 8, 8)
    assert config.num_key_value_heads == 2 and config.vocab_size == 6400
    assert config.intermediate_size == 1408 == default_intermediate_size(512)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 1e6 and config.tie_word_embeddings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(hidden_size=100, num_attention_heads=8),
            "hidden_size=100 is not divisible by num_attention_heads=8",
        ),
        (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads=3"),
        (
            dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3),
            "num_experts_per_tok=3 exceeds",
        ),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(hidden_size=-8), "hidden_size=-8"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(use_moe=True, scoring_func="relu"), "scoring_func='relu'"),
        (dict(hidden_size=96, num_attention_heads=32), "head_dim=3 must be even"),
        (dict(vocab_size=2), "eos_token_id=2 is outside"),
    ],
)
def test_invalid_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MiniMindConfig(**kwargs)


def test_round_trip_dict_keeps_unknown_keys():
    config = MiniMindConfig.from_dict({**get_preset("minimind3").to_dict(), "flash_attn": True})
    assert config.qk_norm and config.head_dim == 96
    assert config.extra["flash_attn"] is True
    assert MiniMindConfig.from_dict(config.to_dict()) == config


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nano'"):
        get_preset("nano")


@pytest.mark.parametrize(
    "name, total_millions, active_millions",
    [
        ("demo", (1, 5), None),
        ("minimind2-small", (24, 28), None),
        ("minimind2", (100, 108), None),
        ("minimind2-moe", (140, 150), (88, 96)),
        ("minimind3", (58, 66), None),
    ],
)
def test_preset_sizes(name, total_millions, active_millions):
    counts = count_parameters(MiniMindForCausalLM(get_preset(name)))
    assert total_millions[0] <= counts["total"] / 1e6 <= total_millions[1]
    if active_millions:
        assert active_millions[0] <= counts["active"] / 1e6 <= active_millions[1]
    else:
        assert counts["active"] == counts["total"]


def test_every_preset_builds():
    assert set(PRESETS) >= {
        "demo",
        "minimind2-small",
        "minimind2",
        "minimind2-moe",
        "minimind3",
        "minimind3-moe",
    }
    for name in PRESETS:
        get_preset(name)


# MiniMind2's config.json (model/model_minimind.py before MiniMind-3): every field of its config
# class, MoE fields in the names this package kept; top-1 weights were not renormalised there.
MINIMIND2_JSON = dict(
    architectures=["MiniMindForCausalLM"],
    model_type="minimind",
    dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    hidden_size=640,
    intermediate_size=None,
    max_position_embeddings=32768,
    num_attention_heads=8,
    num_hidden_layers=8,
    num_key_value_heads=2,
    vocab_size=6400,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    inference_rope_scaling=False,
    rope_scaling=None,
    flash_attn=True,
    use_moe=True,
    num_experts_per_tok=1,
    n_routed_experts=4,
    n_shared_experts=1,
    scoring_func="softmax",
    aux_loss_alpha=0.01,
    seq_aux=True,
    norm_topk_prob=True,
)
# MiniMind-3's config.json for its MoE model (model/model_minimind.py, current): its own MoE
# names; top-k weights renormalised whenever norm_topk_prob, as here.
MINIMIND3_JSON = dict(
    architectures=["MiniMindForCausalLM"],
    model_type="minimind",
    hidden_size=768,
    num_hidden_layers=8,
    use_moe=True,
    dropout=0.0,
    vocab_size=6400,
    bos_token_id=1,
    eos_token_id=2,
    flash_attn=True,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=96,
    hidden_act="silu",
    intermediate_size=2432,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=True,
    inference_rope_scaling=False,
    rope_scaling=None,
    num_experts=4,
    num_experts_per_tok=1,
    moe_intermediate_size=2432,
    norm_topk_prob=True,
    router_aux_loss_coef=5e-4,
)


@pytest.mark.parametrize("top_k, norm", [(1, False), (2, True)])
def test_minimind2_top1_config_keeps_its_unnormalised_weight(top_k, norm):
    """MiniMind2 renormalised only for top-k > 1: its top-1 config reads as norm_topk_prob=False,
    so the routed weight stays the expert's probability."""
    config = MiniMindConfig.from_dict({**MINIMIND2_JSON, "num_experts_per_tok": top_k})
    assert (config.num_experts_per_tok, config.norm_topk_prob) == (top_k, norm)
    assert (config.n_routed_experts, config.n_shared_experts, config.seq_aux) == (4, 1, True)
    assert not config.qk_norm and config.intermediate_size == default_intermediate_size(640)
    logits = torch.randn(16, 4)
    weight = moe_route(logits, top_k, config.norm_topk_prob, backend="torch").topk_weight
    top = logits.softmax(-1).topk(top_k).values
    torch.testing.assert_close(weight, top if top_k == 1 else top / top.sum(-1, keepdim=True))


def test_minimind3_config_reads_its_moe_names():
    """MiniMind-3's num_experts / moe_intermediate_size / router_aux_loss_coef, its q/k norm, no
    shared expert and token-level loss: the minimind3-moe preset, norm_topk_prob kept at top-1."""
    config = MiniMindConfig.from_dict(MINIMIND3_JSON)
    preset = get_preset("minimind3-moe")
    assert config.replace(extra={}) == preset
    assert config.extra == {
        "architectures": ["MiniMindForCausalLM"],
        "model_type": "minimind",
        "flash_attn": True,
        "inference_rope_scaling": False,
    }
    wide = MiniMindConfig.from_dict(
        {
            **MINIMIND3_JSON,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 640,
            "router_aux_loss_coef": 0.0,
        }
    )
    assert (wide.n_routed_experts, wide.intermediate_size, wide.aux_loss_alpha) == (8, 640, 0.0)
    dense = MiniMindConfig.from_dict(
        {**MINIMIND3_JSON, "use_moe": False, "moe_intermediate_size": 640}
    )
    assert dense.intermediate_size == 2432 and dense.qk_norm


@pytest.mark.parametrize(
    "config",
    [
        get_preset("minimind3-moe"),
        MiniMindConfig(use_moe=True, num_experts_per_tok=1, n_shared_experts=0),  # no qk_norm
    ],
    ids=["minimind3-moe", "top1-plain"],
)
def test_own_top1_config_round_trips_with_its_normalisation(config):
    assert MiniMindConfig.from_dict(config.to_dict()) == config
    assert config.norm_topk_prob and config.num_experts_per_tok == 1
