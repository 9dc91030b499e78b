"""Data of an SFT run: the conversations (--data_path, else the default offline set with its own
held-out file), the starting model's tokenizer (checked for the chat markers), the SFT cache
(built once by rank 0), packed or padded rows and the resumable sharded loaders. The SFT
counterpart of data_setup.build_data, returning the same TrainingData; wires minimind_fast.data's
SFT modules the way MiniMind's train_full_sft.py wires SFTDataset + DistributedSampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from ..constants import BOS_TOKEN_ID, EOS_TOKEN_ID, SPECIAL_TOKENS
from ..corpus_sft import SFTSet, build_default_sft_set, default_sft_set_name
from ..data import DataError, ResumableSampler, make_dataloader
from ..data.sft import SFTPackedDataset, SFTPaddedDataset, build_sft_cache, split_documents
from ..data.tokenizer import CHAT_TEMPLATE, default_tokenizer_path, load_tokenizer, tokenizer_file
from ..paths import default_cache_dir
from . import distributed
from .data_setup import TrainingData, check_tokenizer, validation_loader
from .prepare import resolve_from_weight

CHAT_MARKERS = (SPECIAL_TOKENS[BOS_TOKEN_ID], SPECIAL_TOKENS[EOS_TOKEN_ID])


def data_files(data_path: Optional[str]) -> tuple[Path, Optional[Path]]:
    """(training file, held-out file or None). No --data_path, or the default set's own
    train.jsonl (a resumed run saved that path): the default set, built on first use."""
    default = SFTSet(default_cache_dir() / default_sft_set_name())
    if data_path is None or Path(data_path).expanduser().resolve() == default.train.resolve():
        built = build_default_sft_set()
        return built.train, built.val
    return Path(data_path).expanduser().resolve(), None


def tokenizer_dir(args, config, resumed_from: Optional[Path]) -> Path:
    """--tokenizer_path; else the resumed checkpoint's copy; else the one saved with
    --from_weight's model; else (from scratch) the default tokenizer."""
    if args.tokenizer_path:
        return Path(args.tokenizer_path)
    if resumed_from is not None:
        return Path(resumed_from)
    if args.from_weight.lower() == "none":
        return default_tokenizer_path(config.vocab_size)
    try:
        origin = resolve_from_weight(args, config)
    except ValueError as error:
        raise ValueError(
            f"{error} (SFT fine-tunes a pretrained model: train one first with "
            "python -m minimind_fast.pretrain, whose run directory is out)"
        ) from None
    folder = origin if origin.is_dir() else origin.parent
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"--from_weight {args.from_weight}: no tokenizer.json beside {origin}; "
            "pass --tokenizer_path DIR, the tokenizer those weights were trained with"
        )
    return folder


def check_chat_tokenizer(directory: Path, log=print) -> None:
    """ValueError when the tokenizer lacks the chat markers; a warning when its
    tokenizer_config.json carries another chat template than the ChatML that SFT trains on."""
    file = tokenizer_file(directory)
    vocab = load_tokenizer_vocab(file)
    missing = [marker for marker in CHAT_MARKERS if vocab is not None and marker not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer {file} has no {' or '.join(missing)}, the chat markers "
            "SFT renders conversations with; pass --tokenizer_path with a "
            "MiniMind-style tokenizer (python -m minimind_fast.tokenizer trains one)"
        )
    load_tokenizer(file)  # the markers' ids: the one-line error names any mismatch
    try:
        settings = json.loads((file.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    template = settings.get("chat_template") if isinstance(settings, dict) else None
    if template is not None and template != CHAT_TEMPLATE:
        log(
            f"warning: {file.parent / 'tokenizer_config.json'} has its own chat template; SFT "
            "trains on plain ChatML (<|im_start|>role\\ncontent<|im_end|>, no default system "
            "prompt, no think tags) and generate --chat renders that too, but transformers' "
            "apply_chat_template on an export of this run would use the file's template"
        )


def load_tokenizer_vocab(file: Path) -> Optional[dict]:
    try:
        return Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
    except Exception:  # tokenizers raises a bare Exception; load_tokenizer names the problem
        return None


def first_question(cache, doc_ids: np.ndarray, tokenizer) -> Optional[str]:
    """The first user message among the conversations doc_ids, decoded from the cache."""
    for doc in doc_ids[:16].tolist():
        ids = cache.conversation(doc)[0].tolist()
        for start in (i for i, token in enumerate(ids) if token == BOS_TOKEN_ID):
            end = ids.index(EOS_TOKEN_ID, start) if EOS_TOKEN_ID in ids[start:] else len(ids)
            text = tokenizer.decode(ids[start + 1 : end], skip_special_tokens=False)
            if text.startswith("user\n"):
                return text[len("user\n") :]
    return None


def build_sft_data(args, config, context, resumed_from: Optional[Path] = None) -> TrainingData:
    """Conversations -> tokenizer -> SFT caches (rank 0 builds, the others open them) ->
    train/held-out rows and loaders. Sets args.sample_prompt to a held-out question when unset."""
    log = print if context.is_main else (lambda *_: None)
    with distributed.main_rank_first(context):
        train_path, val_path = data_files(args.data_path)
        directory = tokenizer_file(tokenizer_dir(args, config, resumed_from)).parent
        check_tokenizer(directory, resumed_from)
        check_chat_tokenizer(directory, log)
        if args.val_fraction == 0:
            val_path = None
        if context.is_main:
            cache = build_sft_cache(train_path, directory, progress=True)
            val_cache = build_sft_cache(val_path, directory, progress=False) if val_path else None
    digests = distributed.broadcast_object(
        (cache.data_digest, val_cache.data_digest if val_cache else None)
        if context.is_main
        else None,
        context,
    )
    if not context.is_main:  # rank 0's caches on a shared file system; else built again here
        cache = build_sft_cache(train_path, directory, progress=False, data_digest=digests[0])
        val_cache = (
            build_sft_cache(val_path, directory, progress=False, data_digest=digests[1])
            if val_path
            else None
        )
    if cache.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer in {directory} has {cache.vocab_size} tokens but the "
            f"model's vocab_size is {config.vocab_size}; pass --vocab_size "
            f"{cache.vocab_size} or the starting model's tokenizer"
        )
    if val_cache is None:
        train_ids, val_ids = split_documents(cache, args.val_fraction, args.seed)
    else:
        train_ids, val_ids = None, np.arange(val_cache.num_docs, dtype=np.int64)
    rows = SFTPackedDataset if args.packing else SFTPaddedDataset
    train_set = rows(cache, train_ids, args.max_seq_len)
    if len(ResumableSampler(len(train_set), args.seed, 0, 0, context.world_size)) == 0:
        raise DataError(
            f"{train_path}: {len(train_set)} training rows cannot feed "
            f"{context.world_size} ranks; add conversations or lower --max_seq_len"
        )
    seeding = "sum" if args.recipe == "minimind" else "mixed"  # MiniMind: randperm at seed + epoch
    sampler = ResumableSampler(
        len(train_set), args.seed, 0, context.rank, context.world_size, seeding=seeding
    )
    loader = make_dataloader(
        train_set,
        args.batch_size,
        sampler,
        args.num_workers,
        pin_memory=context.device.type == "cuda",
    )
    # Worker seeds from this generator, not the global RNG: iterators never shift the training
    # RNG stream (exact resume).
    loader.generator = torch.Generator().manual_seed(args.seed + context.rank)
    held_out = val_cache or cache
    val_loader = validation_loader(held_out, val_ids, rows, args, context)
    if args.sample_prompt is None:  # the final sample answers a question it was not trained on
        tokenizer = load_tokenizer(directory)
        args.sample_prompt = (
            first_question(held_out, val_ids, tokenizer)
            or first_question(cache, train_set.doc_ids, tokenizer)
            or "Hello"
        )
    return TrainingData(
        loader, sampler, val_loader, directory, train_path, cache.data_digest, len(train_set)
    )
