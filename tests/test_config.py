"""Config validation and presets."""
import pytest

from minimind_fast.config import PRESETS, MiniMindConfig, default_intermediate_size, get_preset
from minimind_fast.model import MiniMindForCausalLM, count_parameters


def test_minimind2_defaults():
    config = MiniMindConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 8, 8)
    assert config.num_key_value_heads == 2 and config.vocab_size == 6400
    assert config.intermediate_size == 1408 == default_intermediate_size(512)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 1e6 and config.tie_word_embeddings


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=100, num_attention_heads=8), "hidden_size=100 is not divisible by num_attention_heads=8"),
    (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3), "num_experts_per_tok=3 exceeds"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(hidden_size=-8), "hidden_size=-8"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(use_moe=True, scoring_func="relu"), "scoring_func='relu'"),
    (dict(hidden_size=96, num_attention_heads=32), "head_dim=3 must be even"),
    (dict(vocab_size=2), "eos_token_id=2 is outside"),
])
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


@pytest.mark.parametrize("name, total_millions, active_millions", [
    ("demo", (1, 5), None),
    ("minimind2-small", (24, 28), None),
    ("minimind2", (100, 108), None),
    ("minimind2-moe", (140, 150), (88, 96)),
    ("minimind3", (58, 66), None),
])
def test_preset_sizes(name, total_millions, active_millions):
    counts = count_parameters(MiniMindForCausalLM(get_preset(name)))
    assert total_millions[0] <= counts["total"] / 1e6 <= total_millions[1]
    if active_millions:
        assert active_millions[0] <= counts["active"] / 1e6 <= active_millions[1]
    else:
        assert counts["active"] == counts["total"]


def test_every_preset_builds():
    assert set(PRESETS) >= {"demo", "minimind2-small", "minimind2", "minimind2-moe", "minimind3", "minimind3-moe"}
    for name in PRESETS:
        get_preset(name)
