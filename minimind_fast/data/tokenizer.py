"""Byte-level BPE tokenizer with MiniMind's special tokens, trained with the `tokenizers` library.

Follows MiniMind's `scripts/train_tokenizer.py`: `models.BPE()`, a ByteLevel pre-tokenizer with
`add_prefix_space=False`, a ByteLevel decoder, no normalizer, the 256-byte initial alphabet, and the
special tokens `<|endoftext|>` (id 0, pad), `<|im_start|>` (id 1, BOS), `<|im_end|>` (id 2, EOS).
Byte-level BPE without a normalizer makes encode -> decode exact on any UTF-8 text. Special-token
strings written literally in a text are read as the special tokens, as MiniMind's tokenizer does;
the token cache decides what to do with them (see `encoding.py`).

The output directory holds `tokenizer.json` plus a `tokenizer_config.json` that
`transformers.AutoTokenizer.from_pretrained(dir)` / `PreTrainedTokenizerFast` load; both are
written through temp files, so a failed write (a full disk) leaves no half-written file.
The command line lives in `minimind_fast/tokenizer.py` (`python -m minimind_fast.tokenizer`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..constants import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, SPECIAL_TOKENS
from ..corpus import build_default_corpus
from ..paths import default_cache_dir
from .errors import DataError, writing
from .reader import SkipStats, check_data_path, iter_documents

MODEL_MAX_LENGTH = 32768
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
CHAT_TEMPLATE = (  # plain ChatML, so the saved tokenizer is also usable for later SFT
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _iter_texts(files: Iterable[Path], stats: list[SkipStats]) -> Iterator[str]:
    """The documents of `files` in order; one SkipStats per file is appended to `stats`."""
    for path in files:
        stats.append(SkipStats(path))
        yield from (text for _, text in iter_documents(path, stats[-1]))


def _tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "pad_token": SPECIAL_TOKENS[PAD_TOKEN_ID],
        "unk_token": SPECIAL_TOKENS[PAD_TOKEN_ID],
        "bos_token": SPECIAL_TOKENS[BOS_TOKEN_ID],
        "eos_token": SPECIAL_TOKENS[EOS_TOKEN_ID],
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on JSONL/.txt files.

    Writes out_dir/tokenizer.json and out_dir/tokenizer_config.json; returns out_dir. Unusable
    lines are skipped and logged per file (file, reason, line numbers), as the token cache does.
    Raises ValueError (DataError for unusable files or a failed write) with the value and the fix.
    """
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or vocab_size < MIN_VOCAB_SIZE
    ):
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
            "MiniMind uses 6400"
        )
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        raise ValueError("no training files given: pass at least one .jsonl or .txt file")
    paths = [check_data_path(f) for f in files]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    stats: list[SkipStats] = []
    tokenizer.train_from_iterator(_iter_texts(paths, stats), trainer=trainer)
    if tokenizer.get_vocab_size() <= MIN_VOCAB_SIZE:
        skipped = "; ".join(f"{s.path}: {s.summary()}" for s in stats if s.total)
        skipped = f" (skipped {skipped})" if skipped else ""
        raise DataError(
            f"no usable text in {', '.join(map(str, paths))}: the tokenizer learned "
            f'no merges{skipped}. Check the files\' format (JSONL with a "text" '
            "field, or .txt)."
        )
    for file_stats in stats:  # after the check above: a refusal carries them in its one line
        file_stats.log()
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:  # BpeTrainer puts specials first; be sure
            raise RuntimeError(
                f"special token {token} got id {tokenizer.token_to_id(token)}, expected {token_id}"
            )

    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False)
        + "\n",
    }
    _write_files_atomic(Path(out_dir), files, "the tokenizer")
    return Path(out_dir)


def _write_files_atomic(out_dir: Path, files: dict[str, str], what: str) -> None:
    """Write every file to a temp file in `out_dir` first, then rename them all: a failure (a full
    disk) leaves the old files or none, never half of them; a directory it created goes again."""
    created = not out_dir.exists()
    temps: dict[str, str] = {}
    try:
        with writing(out_dir, what):
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                fd, temps[name] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
                os.close(fd)
                with open(temps[name], "w", encoding="utf-8") as file:
                    file.write(text)
                os.chmod(temps[name], 0o644)  # mkstemp makes it owner-only
            for name, tmp in temps.items():
                os.replace(tmp, out_dir / name)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def tokenizer_file(path) -> Path:
    """The tokenizer.json for `path` (a directory holding one, or the file itself)."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"tokenizer not found: {file} does not exist. Pass a directory "
            "containing tokenizer.json (or the file itself), or train one with "
            "`python -m minimind_fast.tokenizer --data FILE --vocab_size 6400 "
            "--out DIR`."
        )
    return file


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer from a directory or a tokenizer.json; check MiniMind's special-token ids."""
    file = tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception on parse errors
        raise ValueError(
            f"cannot read tokenizer {file}: {error}. Point at a tokenizer.json "
            "written by the `tokenizers` library, or retrain it with "
            "python -m minimind_fast.tokenizer."
        ) from None
    for token_id, token in enumerate(SPECIAL_TOKENS):
        found = tokenizer.token_to_id(token)
        if found != token_id:
            needed = ", ".join(f"{t}={i}" for i, t in enumerate(SPECIAL_TOKENS))
            raise ValueError(
                f"tokenizer {file} maps {token} to id {found}, but minimind_fast "
                f"needs {needed}. Train a tokenizer with "
                "python -m minimind_fast.tokenizer (or use MiniMind's)."
            )
    return tokenizer


def default_tokenizer_path(vocab_size: int = 6400) -> Path:
    """Directory of the default tokenizer, trained on the default corpus on first use and cached.

    Training goes to a temp directory renamed into place, so a crash or a concurrent process never
    sees a half-written tokenizer; the loser of a race discards its copy.
    """
    corpus = build_default_corpus()
    final = default_cache_dir() / f"tokenizer-{corpus.stem}-vocab{vocab_size}"
    if (final / "tokenizer.json").is_file() and (final / "tokenizer_config.json").is_file():
        return final
    with writing(final.parent, "the default tokenizer"):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        train_tokenizer([corpus], vocab_size, tmp)
        with writing(final.parent, "the default tokenizer"):
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "tokenizer.json").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
