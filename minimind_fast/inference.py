"""Load a trained model for inference, sample text from it, and chat with it (used by generate,
pretrain and sft).

`load_for_inference(ckpt, device)` reads a run directory (its newest complete checkpoint), a
checkpoint directory, an exported HF directory or a weights file through interop.load_weights
(every tensor checked: floating point, finite, the config's shapes). `sample_text(model,
tokenizer, prompt)` encodes the prompt as MiniMind's pretraining documents begin (BOS, then the
text), fits it to the context window (`fit_to_context`) and decodes the continuation.
`ChatSession` renders a conversation with the ChatML template the SFT data uses, drops its
oldest exchanges when it outgrows the context window, and streams each reply; `score_answers`
rates a model's replies to held-out SFT questions (token F1, ROUGE-L). Follows MiniMind's
eval_llm.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoints import resolve_checkpoint_path
from .config import PRESETS, MiniMindConfig, get_preset
from .constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from .data.reader import SkipStats
from .data.sft_format import Message, check_sft_data_path, conversation_problem, iter_conversations
from .data.sft_metrics import answer_scores
from .data.sft_template import ChatTemplateEncoder
from .data.tokenizer import default_tokenizer_path, load_tokenizer
from .dtypes import inference_dtype
from .interop import load_weights
from .model import MiniMindForCausalLM
from .weights import validate_state_dict

PRESET_FIX = (
    f"pass the --preset the weights were trained with (one of {', '.join(PRESETS)}) or "
    "put the training run's config.json beside them"
)


def _with_preset_hint(message: str, path: Path, state: Optional[dict] = None) -> str:
    """`message`, plus the presets a bare weights file (no config.json beside it) fits."""
    if path.is_dir() or (path.parent / "config.json").is_file():
        return message
    if state is None:
        try:
            _, state = load_weights(path)  # unvalidated: only the dtype and finiteness checks
        except ValueError:
            return message
    matches = []
    for name in PRESETS:
        try:
            validate_state_dict(state, get_preset(name), source=name)
        except ValueError:
            continue
        matches.append(name)
    if not matches:
        return message
    return f"{message}; these weights fit --preset {' or --preset '.join(matches)}"


def _load_model_weights(path: Path, preset: Optional[str]) -> tuple[MiniMindConfig, dict]:
    config = get_preset(preset) if preset is not None else None
    try:
        found, state = load_weights(path, config, fix=PRESET_FIX)
    except ValueError as error:
        raise ValueError(_with_preset_hint(str(error), path)) from None
    config = config if config is not None else found
    if config is None:
        message = f"no config.json next to {path}: {PRESET_FIX}"
        raise ValueError(_with_preset_hint(message, path, state))
    return config, state


def load_for_inference(
    ckpt, device: torch.device, preset: Optional[str] = None, tokenizer_path=None
):
    """(model in eval mode on `device`, tokenizers.Tokenizer) for a run dir, checkpoint dir,
    exported HF dir or weights file. ValueError (one line) for anything that cannot be loaded."""
    path = resolve_checkpoint_path(ckpt)
    config, state = _load_model_weights(path, preset)
    model = MiniMindForCausalLM(config)
    model.load_state_dict(state)
    model.to(device).eval()
    if tokenizer_path is None:
        beside = (path if path.is_dir() else path.parent) / "tokenizer.json"
        tokenizer_path = beside if beside.is_file() else default_tokenizer_path(config.vocab_size)
    return model, load_tokenizer(tokenizer_path)


def fit_to_context(
    ids: list[int], max_new_tokens: int, window: int
) -> tuple[list[int], int, list[str]]:
    """(prompt ids, new tokens, notes) that fit a `window`-token context.

    The prompt keeps all of itself when it fits beside `max_new_tokens`; else its most recent
    tokens after the leading BOS, but at least half the window, so that a huge --max_new_tokens
    cannot push the prompt out. Then the new tokens are capped to what is left. Each change is
    one note for the user."""
    notes = []
    keep = min(len(ids), max(window - max_new_tokens, window // 2, 1))
    new = min(max_new_tokens, window - keep)
    if keep < len(ids):
        notes.append(
            f"the prompt is {len(ids)} tokens (with BOS) and the {window}-token context "
            f"window holds {keep} of them beside {new} new tokens: keeping its most "
            f"recent {keep - 1} after BOS"
        )
        ids = ids[:1] + ids[len(ids) - keep + 1 :]
    if new < max_new_tokens:
        notes.append(
            f"--max_new_tokens {max_new_tokens} does not fit the {window}-token context "
            f"window after the prompt's {keep} tokens: generating at most {new}"
        )
    return ids, new, notes


def check_prompt(prompt: str) -> None:
    """ValueError unless `prompt` is text the tokenizer can take: bytes that are not UTF-8 reach
    Python (argv, surrogateescape) as lone surrogates, which cannot be encoded."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the prompt (--prompt) is not valid UTF-8 (undecodable byte(s) at "
            f"character {error.start}); pass UTF-8 text"
        ) from None


def print_note(note: str) -> None:
    """The default `note` of sample_text: one `note:` line on stderr."""
    print(f"note: {note}", file=sys.stderr, flush=True)


@torch.no_grad()
def generate_tokens(
    model,
    ids: list[int],
    max_new_tokens: int,
    generator: torch.Generator,
    streamer: Optional[Callable[[torch.Tensor], None]] = None,
    **sampling,
) -> list[int]:
    """The tokens sampled after `ids` (the closing EOS included when one comes), in eval mode and
    the device's inference dtype. sampling: temperature, top_k, top_p, repetition_penalty."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        dtype = inference_dtype(device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                eos_token_id=EOS_TOKEN_ID,
                generator=generator,
                streamer=streamer,
                **sampling,
            )
    finally:
        model.train(was_training)
    return tokens[0, len(ids) :].tolist()


def _generator(model, seed: int) -> torch.Generator:
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def sample_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.1,
    seed: int = 0,
    note: Callable[[str], None] = print_note,
) -> str:
    """The prompt (its most recent context window) followed by a sampled continuation, decoded
    (special tokens dropped). Whatever did not fit the context window is reported via `note`."""
    check_prompt(prompt)
    ids = [BOS_TOKEN_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    window = model.config.max_position_embeddings
    ids, max_new_tokens, notes = fit_to_context(ids, max_new_tokens, window)
    for line in notes:
        note(line)
    new = generate_tokens(
        model,
        ids,
        max_new_tokens,
        _generator(model, seed),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    return tokenizer.decode(ids + new, skip_special_tokens=True)


def sample_reply(
    model,
    tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.1,
    seed: int = 0,
    note: Callable[[str], None] = print_note,
) -> str:
    """The decoded reply (special tokens dropped) sampled after a chat prompt's ids."""
    window = model.config.max_position_embeddings
    prompt_ids, max_new_tokens, notes = fit_to_context(prompt_ids, max_new_tokens, window)
    for line in notes:
        note(line)
    new = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens,
        _generator(model, seed),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )
    return tokenizer.decode(new, skip_special_tokens=True)


class ReplyStream:
    """A `model.generate` streamer that writes a reply's text as its tokens come. A byte-level
    token can end inside a UTF-8 character; its text waits until the character is whole."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.shown and not text.endswith("\ufffd"):
            self.write(text[self.shown :])
            self.shown = len(text)


class ChatSession:
    """A conversation with a chat model: each user message is answered after the conversation
    so far, rendered with the ChatML template SFT trains on. When the prompt would leave less
    than a reply's room (max_new_tokens, at most half the window) in the `window`-token context,
    the oldest exchanges are dropped (the system prompt stays), with one `note`. One sampling
    generator, seeded once, serves the whole conversation."""

    def __init__(
        self,
        model,
        tokenizer,
        system: Optional[str] = None,
        max_new_tokens: int = 256,
        window: Optional[int] = None,
        seed: int = 0,
        note: Callable[[str], None] = print_note,
        **sampling,
    ):
        limit = model.config.max_position_embeddings
        self.window = limit if window is None else window
        if not 2 <= self.window <= limit:
            raise ValueError(
                f"--max_context {window} must be in [2, {limit}] (the model's "
                "max_position_embeddings)"
            )
        self.model, self.tokenizer, self.note = model, tokenizer, note
        self.encoder = ChatTemplateEncoder(tokenizer)
        self.system = [] if system is None else [("system", self._checked(system, "system"))]
        self.history: list[Message] = []  # finished (user, assistant) exchanges
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.generator = _generator(model, seed)

    @staticmethod
    def _checked(text: str, role: str) -> str:
        check_prompt(text)
        problem = conversation_problem([{"role": role, "content": text}], require_assistant=False)
        if problem is not None:
            raise ValueError(f"the {role} message cannot be used: {problem}")
        return text

    def prompt(self, user: str) -> tuple[list[int], int]:
        """(prompt ids, tokens the reply may take) for `user` after the kept history."""
        self._checked(user, "user")
        reserve = min(self.max_new_tokens, self.window // 2)
        dropped = 0
        while True:
            ids = self.encoder.encode_prompt(self.system + self.history + [("user", user)])
            if len(ids) + reserve <= self.window or not self.history:
                break
            del self.history[:2]
            dropped += 1
        if dropped:
            self.note(
                f"the conversation outgrew the {self.window}-token context window: dropped "
                f"its {dropped} oldest exchange(s)"
            )
        if len(ids) + reserve > self.window:
            raise ValueError(
                f"the message takes {len(ids)} tokens with the chat markers"
                f"{' and the system prompt' if self.system else ''}, but the "
                f"{self.window}-token context window keeps {reserve} for the reply; "
                "shorten it (or lower --max_new_tokens)"
            )
        return ids, min(self.max_new_tokens, self.window - len(ids))

    def reply(self, user: str, write: Optional[Callable[[str], None]] = None) -> str:
        """The model's reply to `user` (written piece by piece to `write` while it is
        generated); the exchange joins the history unless the reply is empty."""
        ids, budget = self.prompt(user)
        streamer = ReplyStream(self.tokenizer, write) if write is not None else None
        new = generate_tokens(self.model, ids, budget, self.generator, streamer, **self.sampling)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if text.strip():  # an empty reply cannot be rendered back into the template
            self.history += [("user", user), ("assistant", text)]
        return text


def score_answers(
    model,
    tokenizer,
    path,
    max_new_tokens: int = 128,
    limit: Optional[int] = None,
    seed: int = 0,
    **sampling,
) -> dict:
    """Mean token F1 and ROUGE-L of the model's replies against the reference answers of an SFT
    JSONL file: each conversation's first assistant message, asked with the messages before it
    (conversations that open with the assistant are passed over). {"token_f1", "rouge_l",
    "count"}; ValueError when the file has no usable question."""
    path = check_sft_data_path(path)
    encoder = ChatTemplateEncoder(tokenizer)
    window = model.config.max_position_embeddings
    predictions, references = [], []
    stats = SkipStats(path)
    for _, messages in iter_conversations(path, stats):
        first = next(i for i, (role, _) in enumerate(messages) if role == "assistant")
        if first == 0:
            continue
        ids = encoder.encode_prompt(messages[:first])
        if len(ids) >= window:
            continue
        new = generate_tokens(
            model, ids, min(max_new_tokens, window - len(ids)), _generator(model, seed), **sampling
        )
        predictions.append(tokenizer.decode(new, skip_special_tokens=True))
        references.append(messages[first][1])
        if limit is not None and len(references) >= limit:
            break
    if not references:
        raise ValueError(
            f"{path} has no usable question (a user message followed by an "
            "assistant reply): pass an SFT JSONL file"
        )
    return answer_scores(predictions, references)
