"""Tokenizer: exact byte-level round trip, MiniMind's special-token ids, transformers loading,
errors, CLI."""

import json

import pytest

from minimind_fast.constants import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, SPECIAL_TOKENS
from minimind_fast.tokenizer import load_tokenizer, main, train_tokenizer

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    (
        "def fibonacci(n):\n    if n < 2:\n        return n\n"
        "    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    ),
    "小型语言模型的预训练需要大量的文本数据。你好，世界！",
    "Return a new list containing all items from the iterable in ascending order.",
]

NASTY = [
    "",
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tand\n\nnewlines\r\n\r\nand   runs      of      spaces\n\n\n",
    "你好，世界！预训练一个小模型。",
    "emoji 🤖🚀👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽 zero-width\u200bjoiner",
    "class A:\n\tdef f(self, x: int) -> dict[str, int]:\n\t\treturn {'a': x ** 2}  # ok\n",
    "mixed Ünïcödé façade naïve — “quotes” ‘single’ … ½ ∑ √ ∞ ≠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "combining e\u0301 vs \u00e9 must not be normalised",
    "\x00\x01 control chars \x7f and a lone \ufeff BOM",
    "Arabic مرحبا Hebrew שלום Hindi नमस्ते Japanese こんにちは Korean 안녕하세요",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = root / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TRAIN_TEXTS * 3),
        encoding="utf-8",
    )
    return train_tokenizer([data], 400, root / "out")


def test_files_written(tokenizer_dir):
    assert (tokenizer_dir / "tokenizer.json").is_file()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["pad_token"], config["bos_token"], config["eos_token"]) == SPECIAL_TOKENS
    assert config["model_max_length"] == 32768


def test_special_token_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert (
        [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        == [PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID]
        == [0, 1, 2]
    )
    assert 300 < tok.get_vocab_size() <= 400
    # no post-processor: encoding adds no BOS/EOS by itself (the data pipeline adds them)
    assert tok.encode("abc").ids == tok.encode("abc", add_special_tokens=False).ids
    assert tok.encode("<|im_start|>hi<|im_end|>").ids[0] == BOS_TOKEN_ID


@pytest.mark.parametrize("text", NASTY)
def test_round_trip_exact(tokenizer_dir, text):
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # plain text never yields control tokens


def test_round_trip_random_unicode(tokenizer_dir):
    import random

    rng = random.Random(0)
    tok = load_tokenizer(tokenizer_dir)
    for _ in range(20):
        text = "".join(
            chr(
                rng.choice(
                    [
                        rng.randrange(0x20, 0x7F),
                        rng.randrange(0xA0, 0xD7FF),
                        rng.randrange(0xE000, 0x10FFFF),
                    ]
                )
            )
            for _ in range(50)
        )
        assert tok.decode(tok.encode(text).ids) == text


def test_transformers_loads_same_ids(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(tokenizer_dir)
    auto = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json")
    )
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)
    for text in NASTY:
        ids = tok.encode(text).ids
        assert auto(text, add_special_tokens=False).input_ids == ids
        assert fast(text, add_special_tokens=False).input_ids == ids
        assert auto.decode(ids) == text


def test_load_errors(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="tokenizer not found.*does not exist.*tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="tokenizer not found"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer .*tokenizer.json"):
        load_tokenizer(garbage)
    # a valid tokenizer whose special tokens are not at 0/1/2
    from tokenizers import Tokenizer, models

    other = Tokenizer(
        models.BPE(
            vocab={"a": 0, "b": 1, "<|endoftext|>": 2, "<|im_start|>": 3, "<|im_end|>": 4},
            merges=[],
        )
    )
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"maps <\|endoftext\|> to id 2.*needs <\|endoftext\|>=0"):
        load_tokenizer(tmp_path / "other.json")


def test_train_errors(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some text\n")
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 259"):
        train_tokenizer([data], 100, tmp_path / "out")
    with pytest.raises(ValueError, match="data file not found"):
        train_tokenizer([tmp_path / "missing.jsonl"], 300, tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\nnot json\n')
    with pytest.raises(ValueError, match="no usable text in .*bad.jsonl"):
        train_tokenizer([bad], 300, tmp_path / "out")


def test_cli(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(TRAIN_TEXTS), encoding="utf-8")
    assert main(["--data", str(data), "--vocab_size", "300", "--out", str(tmp_path / "cli")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "cli").get_vocab_size() <= 300

    assert main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: data file not found")
        and err.count("\n") == 1
        and "Traceback" not in err
    )
