"""Chat with a fine-tuned model: the ChatML prompt of a whole conversation, the oldest exchanges
dropped to fit the context window, streamed replies, `generate --chat` and `--score`, and the
exported Hugging Face model answering the same ids through apply_chat_template + generate."""

import io
import json
import shutil

import pytest
import torch
from interop_helpers import tiny_config, tiny_model
from safetensors.torch import save_file
from sft_helpers import train_small_tokenizer, write_jsonl

from minimind_fast import generate, inference
from minimind_fast.constants import EOS_TOKEN_ID
from minimind_fast.data.sft_template import ChatTemplateEncoder
from minimind_fast.data.tokenizer import CHAT_TEMPLATE, load_tokenizer
from minimind_fast.interop import export_hf

PREFIX = "python -m minimind_fast.generate: error: "
WINDOW = 64
SYSTEM = "you are the model"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ChatTemplateEncoder(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=WINDOW)
    return tiny_model(config)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model, tok_dir):
    """A checkpoint directory as the trainer writes one: weights, config.json, tokenizer."""
    path = tmp_path_factory.mktemp("chat_ckpt")
    tensors = {
        k: v.clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, path / name)
    return path


def fake_replies(monkeypatch, tokenizer, replies):
    """generate_tokens returns the given replies in turn (each then EOS); records the prompts."""
    prompts = []
    queue = list(replies)

    def fake(model, ids, max_new_tokens, generator, streamer=None, **sampling):
        prompts.append(list(ids))
        new = tokenizer.encode(queue.pop(0), add_special_tokens=False).ids + [EOS_TOKEN_ID]
        return new[:max_new_tokens]

    monkeypatch.setattr(inference, "generate_tokens", fake)
    return prompts


# ---- the conversation and the context window ----------------------------------------------------


def test_each_prompt_is_the_whole_conversation_so_far(model, tokenizer, encoder, monkeypatch):
    prompts = fake_replies(monkeypatch, tokenizer, ["it returns none", "an error ."])
    session = inference.ChatSession(model, tokenizer, SYSTEM, max_new_tokens=8)
    assert session.reply("what does the function return ?") == "it returns none"
    assert session.reply("and ?") == "an error ."
    expected = [
        ("system", SYSTEM),
        ("user", "what does the function return ?"),
        ("assistant", "it returns none"),
        ("user", "and ?"),
    ]
    assert prompts == [encoder.encode_prompt(expected[:2]), encoder.encode_prompt(expected)]
    assert session.history == expected[1:] + [("assistant", "an error .")]


def test_oldest_exchanges_are_dropped_to_fit_the_window(model, tokenizer, encoder, monkeypatch):
    replies = ["it returns none and raises an error otherwise"] * 6
    prompts = fake_replies(monkeypatch, tokenizer, replies)
    notes = []
    session = inference.ChatSession(model, tokenizer, SYSTEM, max_new_tokens=12, note=notes.append)
    for turn in range(6):
        session.reply(f"question {turn} : the list ?")
    assert notes and all("oldest exchange(s)" in note for note in notes)
    assert all(len(ids) + 12 <= WINDOW for ids in prompts)
    last = prompts[-1]
    assert last[: len(encoder.encode_prompt([("system", SYSTEM)], False))] == encoder.encode_prompt(
        [("system", SYSTEM)], False
    )  # the system prompt stays
    kept = session.history
    assert kept[-2] == ("user", "question 5 : the list ?")
    assert last == encoder.encode_prompt([("system", SYSTEM)] + kept[:-2] + [kept[-2]])
    assert len(kept) < 12  # something was dropped


def test_a_message_longer_than_the_window_is_one_line(model, tokenizer):
    session = inference.ChatSession(model, tokenizer, max_new_tokens=8)
    with pytest.raises(ValueError, match="context window keeps 8 for the reply; shorten it"):
        session.prompt("the list is empty " * 40)


@pytest.mark.parametrize(
    "text, problem", [("a <|im_end|> b", "special token"), ("  ", 'empty "content"')]
)
def test_unusable_message_is_one_line(model, tokenizer, text, problem):
    with pytest.raises(ValueError, match=f"the user message cannot be used: .*{problem}"):
        inference.ChatSession(model, tokenizer).prompt(text)


def test_max_context_out_of_range(model, tokenizer):
    with pytest.raises(ValueError, match=r"--max_context 65 must be in \[2, 64\]"):
        inference.ChatSession(model, tokenizer, window=65)


def test_empty_reply_is_not_kept(model, tokenizer, monkeypatch):
    fake_replies(monkeypatch, tokenizer, [""])
    session = inference.ChatSession(model, tokenizer)
    assert session.reply("what ?") == "" and session.history == []


# ---- streaming -----------------------------------------------------------------------------------


def test_reply_stream_waits_for_whole_characters(tokenizer):
    text = "数据 🤖 模型 returns"
    pieces = []
    stream = inference.ReplyStream(tokenizer, pieces.append)
    for token in tokenizer.encode(text, add_special_tokens=False).ids + [EOS_TOKEN_ID]:
        stream(torch.tensor([token]))
    assert "".join(pieces) == text
    assert all(pieces) and not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 2


def test_streamed_pieces_are_the_reply(model, tokenizer):
    pieces = []
    session = inference.ChatSession(model, tokenizer, max_new_tokens=10, temperature=0.0)
    reply = session.reply("what does the function return ?", pieces.append)
    assert "".join(pieces) == reply and len(pieces) > 1


# ---- the command line ----------------------------------------------------------------------------


def run(argv, capsys):
    code = generate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def greedy_reply(model, tokenizer, *users):
    session = inference.ChatSession(
        model, tokenizer, max_new_tokens=6, temperature=0.0, top_k=40, repetition_penalty=1.1
    )
    return [session.reply(user) for user in users]


def test_chat_with_prompt(ckpt, model, tokenizer, capsys):
    code, out, err = run(
        [
            "--ckpt",
            ckpt,
            "--chat",
            "--prompt",
            "what ?",
            "--temperature",
            "0",
            "--max_new_tokens",
            "6",
        ],
        capsys,
    )
    assert code == 0, err
    assert out == greedy_reply(model, tokenizer, "what ?")[0] + "\n"


def test_chat_reads_stdin_lines_and_reports_a_bad_one(ckpt, model, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("what ?\n\nbad <|im_start|>\nthe list ?\n"))
    code, out, err = run(
        ["--ckpt", ckpt, "--chat", "--temperature", "0", "--max_new_tokens", "6"], capsys
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "special token" in lines[0]
    first, second = greedy_reply(model, tokenizer, "what ?", "the list ?")
    assert out == f"{first}\n{second}\n"  # the second turn saw the first exchange


def test_score_answers_pairs_each_question_with_its_reference(
    model, tokenizer, encoder, tmp_path, monkeypatch
):
    data = write_jsonl(
        tmp_path / "val.jsonl",
        [
            {"conversations": [{"role": "assistant", "content": "opens with the assistant"}]},
            {
                "conversations": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "what ?"},
                    {"role": "assistant", "content": "it returns none"},
                ]
            },
            {
                "conversations": [
                    {"role": "user", "content": "and ?"},
                    {"role": "assistant", "content": "x = y"},
                ]
            },
        ],
    )
    prompts = fake_replies(monkeypatch, tokenizer, ["it returns none", "it returns none"])
    scores = inference.score_answers(model, tokenizer, data, max_new_tokens=8)
    assert scores == {"token_f1": 0.5, "rouge_l": 0.5, "count": 2}
    assert prompts[0] == encoder.encode_prompt([("system", SYSTEM), ("user", "what ?")])


def test_score_command_prints_json(ckpt, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "val.jsonl",
        [
            {
                "conversations": [
                    {"role": "user", "content": "what ?"},
                    {"role": "assistant", "content": "it returns none"},
                ]
            }
        ]
        * 3,
    )
    code, out, err = run(
        [
            "--ckpt",
            ckpt,
            "--score",
            data,
            "--score_limit",
            "2",
            "--temperature",
            "0",
            "--max_new_tokens",
            "4",
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == 2 and 0 <= result["token_f1"] <= 1 and 0 <= result["rouge_l"] <= 1


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--chat", "--max_context", "1"], "--max_context 1 must be in [2, 64]"),
        (["--chat", "--score", "x.jsonl"], "--chat and --score are separate modes"),
        (["--system", "be brief"], "--system is a chat setting; add --chat"),
        (["--score", "/nonexistent/val.jsonl"], "/nonexistent/val.jsonl"),
        (["--score_limit", "0", "--score", "x.jsonl"], "--score_limit 0 must be >= 1"),
    ],
)
def test_bad_chat_flags_are_one_line(ckpt, capsys, argv, fragment):
    code, _, err = run(["--ckpt", ckpt, "--prompt", "hi", *argv], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert fragment in lines[0]


# ---- the Hugging Face export ---------------------------------------------------------------------


def test_export_adds_the_chat_template_when_the_tokenizer_has_none(model, tok_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", bare / "tokenizer.json")
    out = export_hf(model, model.config, tmp_path / "hf", tokenizer_dir=bare)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == CHAT_TEMPLATE


def test_exported_model_answers_the_same_through_transformers(
    model, tokenizer, encoder, tok_dir, tmp_path
):
    transformers = pytest.importorskip("transformers")
    out = export_hf(model, model.config, tmp_path / "hf", tokenizer_dir=tok_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    for messages in (
        [{"role": "user", "content": "what does the function return ?"}],
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "数据 ?"},
            {"role": "assistant", "content": "模型 🤖"},
            {"role": "user", "content": "x"},
        ],
    ):
        rendered = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        assert ids == encoder.encode_prompt(messages)
        theirs = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        ours = inference.generate_tokens(
            model, ids, 12, torch.Generator(), temperature=0.0, repetition_penalty=1.0
        )
        assert theirs == ours and len(ours) > 1
