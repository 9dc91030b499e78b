"""Interop: HF export (stock architectures, logits + greedy parity), import round trip, weight
loading."""

import json
import sys

import pytest
import torch
from interop_helpers import VOCAB, make_tokenizer_dir, tiny_config, tiny_model

from minimind_fast.export import main as export_main
from minimind_fast.interop import (
    export_hf,
    from_hf_config,
    hf_architecture,
    import_hf,
    load_weights,
    to_hf_config,
    validate_state_dict,
)
from minimind_fast.model import MiniMindForCausalLM

transformers = pytest.importorskip(
    "transformers", reason="the HF tests need transformers: pip install transformers"
)

YARN = {
    "type": "yarn",
    "factor": 4,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "attention_factor": 1.0,
}
CASES = {  # name: (config overrides, transformers class)
    "llama": (dict(), "LlamaForCausalLM"),
    "llama-untied-yarn": (
        dict(tie_word_embeddings=False, rope_scaling=YARN, rope_theta=1e4),
        "LlamaForCausalLM",
    ),
    "qwen3": (dict(qk_norm=True, head_dim=24), "Qwen3ForCausalLM"),
    "qwen3-moe": (
        dict(qk_norm=True, use_moe=True, n_shared_experts=0, num_experts_per_tok=2),
        "Qwen3MoeForCausalLM",
    ),
    # MiniMind-3-MoE's layout: top-1 renormalised (every weight 1)
    "qwen3-moe-top1": (
        dict(qk_norm=True, use_moe=True, n_shared_experts=0, num_experts_per_tok=1),
        "Qwen3MoeForCausalLM",
    ),
    "qwen2-moe": (
        dict(use_moe=True, n_shared_experts=2, num_experts_per_tok=2),
        "Qwen2MoeForCausalLM",
    ),
    "qwen2-moe-top1": (
        dict(use_moe=True, n_shared_experts=1, num_experts_per_tok=1),
        "Qwen2MoeForCausalLM",
    ),
    "mixtral": (
        dict(use_moe=True, n_shared_experts=0, num_experts_per_tok=2),
        "MixtralForCausalLM",
    ),
    "mixtral-top1": (
        dict(use_moe=True, n_shared_experts=0, num_experts_per_tok=1),
        "MixtralForCausalLM",
    ),
}


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    overrides, cls = CASES[request.param]
    config = tiny_config(**overrides)
    model = tiny_model(config)
    out = export_hf(model, config, tmp_path_factory.mktemp(request.param))
    return config, model, out, cls


def test_loads_as_stock_architecture_with_equal_logits(exported):
    config, model, out, cls = exported
    hf = load_hf(out)
    assert type(hf).__name__ == cls
    # stock code, no trust_remote_code
    assert type(hf).__module__.startswith("transformers.models.")
    ids = torch.randint(0, VOCAB, (2, 100))  # > original_max_position_embeddings of the YaRN case
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.std() > 0.5  # not a degenerate comparison
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_import_round_trip_is_identical(exported):
    config, model, out, _ = exported
    imported_config, state_dict = import_hf(out)
    assert imported_config == config
    expected = model.state_dict()
    assert list(state_dict) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(state_dict[key], tensor), key
    # the --from_weight path: the directory or its weights file
    for path in (out, out / "model.safetensors"):
        found, loaded = load_weights(path, config)
        assert found == config and all(torch.equal(loaded[k], v) for k, v in expected.items())


@pytest.mark.parametrize("case", ["llama", "qwen3", "qwen2-moe"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    config = tiny_config(**CASES[case][0])
    model = tiny_model(config)
    hf = load_hf(export_hf(model, config, tmp_path))
    hf.generation_config.eos_token_id = None  # generate the full length on both sides
    prompt = torch.randint(3, VOCAB, (2, 7))
    ours = model.generate(prompt, max_new_tokens=20, temperature=0, eos_token_id=-1)
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=config.pad_token_id,
    )
    assert ours.shape == (2, 27)
    assert torch.equal(ours, theirs)


def test_logits_comparison_detects_a_wrong_mapping(tmp_path):
    """Negative control: the same weights with a different rope_theta in config.json must differ."""
    config = tiny_config(rope_scaling=YARN, rope_theta=1e4)
    model = tiny_model(config)
    out = export_hf(model, config, tmp_path)
    hf_config = json.loads((out / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        hf_config[key]["factor"] = 1.0  # drop YaRN's interpolation
    (out / "config.json").write_text(json.dumps(hf_config))
    ids = torch.randint(0, VOCAB, (1, 100))
    with torch.no_grad():
        assert (model(ids).logits - load_hf(out)(ids).logits).abs().max() > 1e-2


def test_config_json_fields(tmp_path):
    config = tiny_config(
        qk_norm=True, head_dim=24, rms_norm_eps=1e-6, rope_theta=5e5, tie_word_embeddings=False
    )
    hf = to_hf_config(config, torch.float32)
    assert (hf["model_type"], hf["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    fields = (hf["head_dim"], hf["rms_norm_eps"], hf["rope_theta"], hf["tie_word_embeddings"])
    assert fields == (24, 1e-6, 5e5, False)
    assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
    assert hf["rope_scaling"] is None
    assert hf["attention_bias"] is False and hf["use_sliding_window"] is False
    assert hf["sliding_window"] is None
    out = export_hf(tiny_model(config), config, tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert loaded.sliding_window is None and set(loaded.layer_types) == {"full_attention"}
    assert loaded.rope_parameters["rope_theta"] == 5e5 and loaded.head_dim == 24


def test_yarn_written_for_both_transformers_generations():
    hf = to_hf_config(tiny_config(rope_scaling=YARN))
    expected = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": 1.0,
    }
    assert hf["rope_scaling"] == expected  # transformers 4.x
    assert hf["rope_parameters"] == {**expected, "rope_theta": 1e6, "truncate": True}  # 5.x


def test_tied_embeddings_stored_once(tmp_path):
    from safetensors import safe_open

    for tied in (True, False):
        config = tiny_config(tie_word_embeddings=tied)
        out = export_hf(tiny_model(config), config, tmp_path / str(tied))
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert ("lm_head.weight" in f.keys()) is not tied


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rope_scaling={**YARN, "factor": 8}), "factor"),  # factor != max_pos / original
        # see test_yarn_ramp_clamp_differs_where_export_refuses
        (dict(rope_scaling={**YARN, "beta_slow": 0.001}, rope_theta=100.0), "ramp"),
        (dict(rope_scaling={**YARN, "type": "linear"}), "linear"),
        (dict(use_moe=True, qk_norm=True, n_shared_experts=1), "shared expert"),
        (dict(use_moe=True, scoring_func="sigmoid"), "softmax"),
        (
            dict(use_moe=True, n_shared_experts=0, num_experts_per_tok=1, norm_topk_prob=False),
            "Mixtral",
        ),
        (dict(hidden_size=66, head_dim=16), "divisible"),
    ],
)
def test_refuses_what_no_stock_architecture_computes(overrides, message, tmp_path):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        export_hf(tiny_model(config), config, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_yarn_ramp_clamp_differs_where_export_refuses():
    """Where the ramp would pass head_dim/2 - 1, HF's YaRN frequencies really differ from
    MiniMind's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minimind_fast.ops.reference import rope_tables

    def frequencies(rope_theta, beta_slow):
        config = tiny_config(rope_scaling={**YARN, "beta_slow": beta_slow}, rope_theta=rope_theta)
        cos, sin = rope_tables(16, config.max_position_embeddings, rope_theta, config.rope_scaling)
        ours = torch.atan2(sin[1, :8], cos[1, :8])  # position 1's angles are the frequencies
        yarn = {
            k: float(v)
            for k, v in YARN.items()
            if k not in ("type", "original_max_position_embeddings")
        }
        parameters = {
            "rope_type": "yarn",
            "rope_theta": rope_theta,
            **yarn,
            "original_max_position_embeddings": 32,
            "beta_slow": beta_slow,
        }
        hf_config = transformers.LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            rope_parameters=parameters,
        )
        theirs, _ = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
        return ours, theirs

    ours, theirs = frequencies(1e4, 1.0)  # exportable
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    ours, theirs = frequencies(100.0, 0.001)  # refused
    assert (ours - theirs).abs().max() > 1e-3


def test_moe_architecture_choice():
    # MiniMind2-MoE: 1 shared, top-2
    assert hf_architecture(tiny_config(use_moe=True)) == "qwen2_moe"
    minimind3_moe = tiny_config(
        use_moe=True, qk_norm=True, n_shared_experts=0, num_experts_per_tok=1
    )
    assert hf_architecture(minimind3_moe) == "qwen3_moe"


def test_norm_topk_prob_exported_as_is_for_every_top_k():
    """Renormalised whenever norm_topk_prob, top-1 included: what Qwen2/3-MoE do with their flag."""
    for top_k in (1, 2):
        for norm in (True, False):
            config = tiny_config(
                use_moe=True,
                qk_norm=True,
                n_shared_experts=0,
                num_experts_per_tok=top_k,
                norm_topk_prob=norm,
            )
            assert to_hf_config(config)["norm_topk_prob"] is norm
            assert from_hf_config(to_hf_config(config)) == config


def test_top1_renormalised_model_equals_stock_qwen3_moe(tmp_path):
    """MiniMind-3's MoE (top-1, norm_topk_prob): transformers' own Qwen3MoeForCausalLM with
    norm_topk_prob=True, built and saved by transformers, imports with equal logits; our export
    of the same model loads back as that class with the flag set and equal logits."""
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=1,
        norm_topk_prob=True,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    stock = transformers.Qwen3MoeForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in stock.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    stock.save_pretrained(tmp_path / "stock")
    config, state = import_hf(tmp_path / "stock")
    assert (config.num_experts_per_tok, config.norm_topk_prob, config.qk_norm) == (1, True, True)
    model = MiniMindForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    ids = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        ours, theirs = model(ids).logits, stock(ids).logits
    assert ours.std() > 0.5
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    hf = load_hf(export_hf(model, config, tmp_path / "export"))
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.norm_topk_prob is True
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=0, atol=1e-4)


def test_minimind2_top1_config_json_loads_unnormalised(tmp_path):
    """A MiniMind2 run directory (its config.json, a .pth): top-1 with MiniMind2's
    norm_topk_prob=True reads as norm_topk_prob=False, which computes what MiniMind2 did."""
    config = tiny_config(use_moe=True, num_experts_per_tok=1, norm_topk_prob=False)
    torch.save(tiny_model(config).state_dict(), tmp_path / "pretrain_64_moe.pth")
    minimind2 = {k: v for k, v in config.to_dict().items() if k not in ("qk_norm", "extra")}
    (tmp_path / "config.json").write_text(json.dumps({**minimind2, "norm_topk_prob": True}))
    found, state = load_weights(tmp_path)
    assert found == config and set(state) == set(tiny_model(config).state_dict())


def test_tokenizer_loads_with_auto_tokenizer(tmp_path):
    tokenizer_dir, tokenizer = make_tokenizer_dir(tmp_path / "tok")
    config = tiny_config()
    out = export_hf(tiny_model(config), config, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    special = (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id)
    assert special == (1, 2, 0)
    text = "the quick brown fox <|im_end|>"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.chat_template == "{{ messages }}"  # the source tokenizer_config is kept


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    tokenizer_dir, _ = make_tokenizer_dir(tmp_path / "tok")
    config = tiny_config(vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(tiny_model(config), config, tmp_path / "out", tokenizer_dir=tokenizer_dir)


def test_minimind_pth_with_wrapper_prefixes(tmp_path):
    config = tiny_config(use_moe=True)
    model = tiny_model(config)
    state = {("module._orig_mod." + k): v.half() for k, v in model.state_dict().items()}
    state["module.model.freqs_cos"] = torch.zeros(3)  # old MiniMind files may carry RoPE buffers
    torch.save(state, tmp_path / "pretrain_64_moe.pth")
    found, loaded = load_weights(tmp_path / "pretrain_64_moe.pth", config)
    assert found is None
    fresh = MiniMindForCausalLM(config)
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(
        fresh.model.layers[1].mlp.experts[3].up_proj.weight,
        model.model.layers[1].mlp.experts[3].up_proj.weight.half().float(),
    )
    torch.save(
        {"model": model.state_dict(), "optimizer": {"state": {}}, "step": 3},
        tmp_path / "resume.pth",
    )
    _, resumed = load_weights(tmp_path / "resume.pth", config)
    assert all(torch.equal(resumed[k], v) for k, v in model.state_dict().items())


def test_run_directory_with_config_json(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config(qk_norm=True)
    model = tiny_model(config)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    for path in (tmp_path, tmp_path / "model.safetensors"):
        found, loaded = load_weights(path)
        assert found == config
        assert torch.equal(loaded["lm_head.weight"], model.lm_head.weight)  # tied: filled in


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.pop("model.layers.1.self_attn.q_norm.weight"),
            r"missing key 'model\.layers\.1\.self_attn\.q_norm\.weight'.*qk_norm",
        ),
        (
            lambda s: s.update({"model.layers.2.input_layernorm.weight": torch.ones(64)}),
            "unexpected.*num_hidden_layers",
        ),
        (
            lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(48, 64)}),
            r"shape \(48, 64\).*\(32, 64\).*num_key_value_heads",
        ),
        (
            lambda s: s.update({"lm_head.weight": torch.ones(VOCAB, 64)}),
            "tie_word_embeddings=False",
        ),
    ],
)
def test_validation_errors_are_one_line_and_name_the_fix(change, message):
    config = tiny_config(qk_norm=True)
    state = dict(tiny_model(config).state_dict())
    change(state)
    with pytest.raises(ValueError, match=message) as error:
        validate_state_dict(state, config)
    assert "\n" not in str(error.value) and "config" in str(error.value)


def test_untied_checkpoint_without_lm_head_names_tie_word_embeddings():
    config = tiny_config(tie_word_embeddings=False)
    state = dict(tiny_model(config).state_dict())
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match="missing key 'lm_head.weight'.*tie_word_embeddings"):
        validate_state_dict(state, config)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}, "rope_scaling": None},
            "llama3",
        ),
        ({"hidden_act": "gelu"}, "silu"),
    ],
)
def test_import_refuses_foreign_settings(edit, message):
    hf = to_hf_config(tiny_config(qk_norm=True))
    hf.update(edit)
    with pytest.raises(ValueError, match=message):
        from_hf_config(hf)


def test_import_refuses_a_gated_shared_expert(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_config(use_moe=True)
    out = export_hf(tiny_model(config), config, tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    # as after fine-tuning in transformers
    tensors["model.layers.0.mlp.shared_expert_gate.weight"] += 0.1
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shared_expert_gate"):
        import_hf(out)


def test_cli_exports_a_run_directory(tmp_path, capsys):
    """The training loop's --save_dir layout: config.json + tokenizer + the latest MiniMind-format
    .pth."""
    run = tmp_path / "run"
    tokenizer_dir, _ = make_tokenizer_dir(run)
    config = tiny_config()
    model = tiny_model(config)
    (run / "config.json").write_text(json.dumps(config.to_dict(), sort_keys=True))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, run / "pretrain_64.pth")
    # ignored: the top-level .pth is the latest
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    out = tmp_path / "hf"
    argv = ["--ckpt", str(run), "--out", str(out), "--dtype", "bfloat16", "--verify"]
    assert export_main(argv) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "tokenizer: yes" in printed
    assert float(printed.split("= ")[-1]) < 1e-4  # logits of the bf16 weights, both sides in fp32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }


def test_cli_reports_missing_config(tmp_path, capsys):
    config = tiny_config()
    torch.save(tiny_model(config).state_dict(), tmp_path / "pretrain_64.pth")
    weights = str(tmp_path / "pretrain_64.pth")
    assert export_main(["--ckpt", weights, "--out", str(tmp_path / "hf")]) == 2
    assert "--config" in capsys.readouterr().err
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config.to_dict()))
    assert (
        export_main(
            ["--ckpt", weights, "--out", str(tmp_path / "hf"), "--config", str(config_file)]
        )
        == 0
    )
    assert "tokenizer: no" in capsys.readouterr().out


def test_export_needs_no_transformers(tmp_path, monkeypatch):
    from minimind_fast.export import verify

    # `import transformers` now raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    config = tiny_config()
    out = export_hf(tiny_model(config), config, tmp_path)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="pip install transformers"):
        verify(out)
