"""`python -m minimind_fast.generate`: what fits the context window, and one-line errors for every
bad flag, bad weights file and bad device (exit 2, no traceback)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interop_helpers import make_tokenizer_dir, tiny_config, tiny_model, write_checkpoint_dir

from minimind_fast import dtypes, inference
from minimind_fast.config import get_preset
from minimind_fast.generate import main as generate_main

REPO = Path(__file__).resolve().parents[1]
PREFIX = "python -m minimind_fast.generate: error: "
WINDOW = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = tiny_config(max_position_embeddings=WINDOW)
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    return write_checkpoint_dir(path, config, tiny_model(config).state_dict())


def run(argv, capsys) -> tuple[int, str, str]:
    code = generate_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_generates_from_a_checkpoint_directory(ckpt, capsys):
    code, out, err = run(
        ["--ckpt", ckpt, "--prompt", "the quick", "--max_new_tokens", "4", "--device", "cpu"],
        capsys,
    )
    assert code == 0 and err == "", err
    assert out.startswith("the quick")


# ---- the context window --------------------------------------------------------------------


def test_fit_to_context_keeps_the_prompt_when_it_fits():
    assert inference.fit_to_context([1, 4, 5], 6, WINDOW) == ([1, 4, 5], 6, [])


def test_fit_to_context_keeps_the_most_recent_window_of_a_long_prompt():
    prompt = [1] + list(range(100, 144))  # BOS + 44 tokens: longer than the window
    ids, new, notes = inference.fit_to_context(prompt, 5, WINDOW)
    assert ids == [1] + prompt[-(WINDOW - 5 - 1) :] and new == 5  # BOS, then the newest tokens
    assert len(notes) == 1 and "45 tokens" in notes[0] and "most recent 26" in notes[0]


def test_fit_to_context_caps_max_new_tokens():
    ids, new, notes = inference.fit_to_context([1, 4, 5], 1000, WINDOW)
    assert ids == [1, 4, 5] and new == WINDOW - 3
    assert len(notes) == 1 and "--max_new_tokens 1000" in notes[0] and str(WINDOW - 3) in notes[0]


def test_fit_to_context_keeps_half_the_window_of_prompt_at_least():
    prompt = [1] + list(range(100, 200))
    ids, new, notes = inference.fit_to_context(prompt, 1000, WINDOW)
    assert len(ids) == WINDOW // 2 and ids[0] == 1 and ids[-1] == prompt[-1] and new == WINDOW // 2
    assert len(notes) == 2


def test_long_prompt_through_the_cli_says_so(ckpt, capsys):
    prompt = " ".join(["dog"] * 30 + ["the", "quick", "brown", "fox"] * 5)  # 50 words + BOS
    code, out, err = run(
        ["--ckpt", ckpt, "--prompt", prompt, "--max_new_tokens", "4", "--temperature", "0"], capsys
    )
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 1 and "most recent" in notes[0] and "context window" in notes[0], err
    words = out.split()
    assert words[:27] == prompt.split()[-27:]  # the newest 27 words, then at most 4 new tokens
    assert len(words) <= 31


def test_max_new_tokens_beyond_the_window_is_capped_with_a_note(ckpt, capsys):
    code, out, err = run(
        ["--ckpt", ckpt, "--prompt", "the", "--max_new_tokens", "100000", "--temperature", "0"],
        capsys,
    )
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and "--max_new_tokens 100000" in err and "30" in err


# ---- one-line errors -----------------------------------------------------------------------

BAD_FLAGS = {
    "temperature-nan": (["--temperature", "nan"], "--temperature"),
    "temperature-negative": (["--temperature", "-0.5"], "--temperature"),
    "temperature-inf": (["--temperature", "inf"], "--temperature"),
    "repetition-penalty-nan": (["--repetition_penalty", "nan"], "--repetition_penalty"),
    "repetition-penalty-zero": (["--repetition_penalty", "0"], "--repetition_penalty"),
    "repetition-penalty-negative": (["--repetition_penalty", "-1"], "--repetition_penalty"),
    "top-p-zero": (["--top_p", "0"], "--top_p"),
    "top-p-above-one": (["--top_p", "1.5"], "--top_p"),
    "top-p-nan": (["--top_p", "nan"], "--top_p"),
    "top-k-negative": (["--top_k", "-3"], "--top_k"),
    "max-new-tokens-zero": (["--max_new_tokens", "0"], "--max_new_tokens"),
    "num-samples-zero": (["--num_samples", "0"], "--num_samples"),
    "device-tpu": (["--device", "tpu"], "--device tpu"),
    "device-xla": (["--device", "xla"], "--device xla"),
    "device-cuda-index": (["--device", f"cuda:{torch.cuda.device_count() + 3}"], "--device cuda:"),
    "prompt-not-utf8": (["--prompt", "caf\udcc3\udca9 \udcff"], "UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line(ckpt, capsys, case):
    flags, fragment = BAD_FLAGS[case]
    code, out, err = run(["--ckpt", ckpt, *flags], capsys)
    assert_error(code, err, fragment)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch or no visible GPU")
def test_cuda_without_cuda_is_one_line(ckpt, capsys):
    code, _, err = run(["--ckpt", ckpt, "--device", "cuda"], capsys)
    assert_error(code, err, "--device cuda", "--device cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_one_line_naming_the_tensor(tmp_path, capsys, bad):
    config = tiny_config(max_position_embeddings=WINDOW)
    state = dict(tiny_model(config).state_dict())
    state["model.layers.0.self_attn.o_proj.weight"][2, 2] = bad
    directory = write_checkpoint_dir(tmp_path / "ckpt", config, state)
    code, _, err = run(["--ckpt", directory], capsys)
    assert_error(code, err, "model.layers.0.self_attn.o_proj.weight", "non-finite")


def test_integer_weights_are_one_line(tmp_path, capsys):
    config = tiny_config(max_position_embeddings=WINDOW)
    state = {k: v.to(torch.int32) for k, v in tiny_model(config).state_dict().items()}
    directory = write_checkpoint_dir(tmp_path / "ckpt", config, state)
    code, _, err = run(["--ckpt", directory], capsys)
    assert_error(code, err, "int32", "floating point")


def test_wrong_preset_for_a_bare_pth_suggests_the_right_one(tmp_path, capsys):
    """A MiniMind .pth has no config beside it: the error names --preset values that fit, and no
    flag that generate does not have."""
    config = get_preset("demo", vocab_size=400)
    torch.save(tiny_model(config).state_dict(), tmp_path / "pretrain_128.pth")
    tokenizer_dir, _ = make_tokenizer_dir(tmp_path / "tok")
    code, _, err = run(
        [
            "--ckpt",
            tmp_path / "pretrain_128.pth",
            "--preset",
            "minimind2-small",
            "--tokenizer_path",
            tokenizer_dir,
        ],
        capsys,
    )
    assert_error(code, err, "the checkpoint has 4 layers", "--preset")
    for flag in ("--hidden_size", "--num_hidden_layers", "--use_moe", "--vocab_size", "--config"):
        assert flag not in err, err
    code, _, err = run(
        ["--ckpt", tmp_path / "pretrain_128.pth", "--tokenizer_path", tokenizer_dir], capsys
    )
    assert_error(code, err, "no config.json", "--preset")


def test_bare_pth_of_a_preset_names_that_preset(tmp_path, capsys):
    config = get_preset("demo")
    torch.save(tiny_model(config).state_dict(), tmp_path / "pretrain_128.pth")
    for flags in (["--preset", "minimind2"], []):  # the wrong preset, or none
        code, _, err = run(["--ckpt", tmp_path / "pretrain_128.pth", *flags], capsys)
        assert_error(code, err, "these weights fit --preset demo")


def run_subprocess(argv: list) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "minimind_fast.generate", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "flags, fragment",
    [
        ([b"--temperature", b"nan"], "--temperature"),
        ([b"--prompt", b"caf\xc3\xa9 \xff\xfe"], "UTF-8"),  # argv bytes that are not UTF-8
    ],
)
def test_errors_in_a_real_process(ckpt, flags, fragment):
    result = run_subprocess([b"--ckpt", str(ckpt).encode(), *flags])
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and fragment in lines[0], err
    assert result.stdout == b""


# ---- devices and dtypes --------------------------------------------------------------------


def test_inference_dtype_follows_the_device():
    assert dtypes.inference_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        expected = torch.bfloat16 if dtypes.bf16_supported(torch.device("cuda")) else torch.float16
        assert dtypes.inference_dtype(torch.device("cuda")) == expected


def test_resolve_device():
    assert dtypes.resolve_device("cpu") == torch.device("cpu")
    assert dtypes.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device tpu"):
        dtypes.resolve_device("tpu")


def test_dtype_names():
    assert dtypes.DTYPES == {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
    assert dtypes.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        dtypes.resolve_dtype("float64", torch.device("cpu"))
    assert dtypes.default_dtype_name(torch.device("cpu")) == "float32"
