"""Data for the training loop: default corpus and tokenizer, the token cache (built once, rank 0
first), the held-out split, packed or padded datasets, and the resumable sharded loaders. Wires
minimind_fast.data together the way MiniMind's train_pretrain.py wires PretrainDataset +
DistributedSampler. `--recipe minimind` reads MiniMind's rows in MiniMind's order: BOS + text +
EOS with special-token strings kept as their ids (its tokenizer call), one padded document per
row, and the epoch order `randperm` under seed + epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader

from ..corpus import build_default_corpus
from ..data import (
    DataError,
    PackedDataset,
    PaddedDataset,
    ResumableSampler,
    build_token_cache,
    make_dataloader,
    split_documents,
)
from ..data.tokenizer import default_tokenizer_path, tokenizer_file
from . import distributed


class TrainingData(NamedTuple):
    loader: DataLoader
    sampler: ResumableSampler
    val_loader: Optional[DataLoader]
    tokenizer_dir: Path
    data_path: Path  # the file the rows come from, resolved
    data_digest: str  # content digest of that file (the token cache's fingerprint)
    num_samples: int  # training rows per epoch


def check_tokenizer(tokenizer_dir: Path, checkpoint_dir: Optional[Path]) -> None:
    """A resumed run must keep the tokenizer it was trained with (else token ids change meaning)."""
    saved = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir is not None else None
    current = tokenizer_file(tokenizer_dir)
    if saved is not None and saved.is_file() and saved.read_bytes() != current.read_bytes():
        raise ValueError(
            f"the tokenizer {current} is not the one {checkpoint_dir} was trained with, "
            f"so token ids would change meaning; pass --tokenizer_path {checkpoint_dir} "
            "(its copy), or start a new run in another --save_dir"
        )


def token_cache_modes(args) -> dict[str, str]:
    """build_token_cache's BOS/EOS options: --add_special_tokens, and special-token strings kept
    as ids (as MiniMind's tokenizer call reads them) only where they can be: padded rows of the
    minimind recipe (packed rows never hold the pad id)."""
    keep = args.recipe == "minimind" and not args.packing
    return dict(
        add_special_tokens=args.add_special_tokens,
        literal_special_tokens="keep" if keep else "split",
    )


def build_data(args, config, context, resumed_from: Optional[Path] = None) -> TrainingData:
    """Corpus -> tokenizer -> token cache (built once by rank 0, then opened by the others: only
    rank 0 reads the whole data file to fingerprint it) -> train/val datasets and loaders."""
    with distributed.main_rank_first(context):
        data_path = Path(args.data_path or build_default_corpus()).expanduser().resolve()
        tokenizer_dir = Path(args.tokenizer_path or default_tokenizer_path(config.vocab_size))
        check_tokenizer(tokenizer_dir, resumed_from)
        if context.is_main:
            cache = build_token_cache(
                data_path, tokenizer_dir, progress=True, **token_cache_modes(args)
            )
    digest = distributed.broadcast_object(cache.data_digest if context.is_main else None, context)
    if not context.is_main:  # rank 0's cache on a shared file system; else this node builds its own
        cache = build_token_cache(
            data_path, tokenizer_dir, progress=False, data_digest=digest, **token_cache_modes(args)
        )
    tokenizer_dir = tokenizer_file(tokenizer_dir).parent
    if cache.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {cache.vocab_size} tokens but the model's "
            f"vocab_size is {config.vocab_size}; pass --vocab_size {cache.vocab_size} "
            "or a smaller tokenizer"
        )
    train_ids, val_ids = split_documents(cache, args.val_fraction, args.seed)
    dataset_class = PackedDataset if args.packing else PaddedDataset
    train_set = dataset_class(cache, train_ids, args.max_seq_len)
    if len(ResumableSampler(len(train_set), args.seed, 0, 0, context.world_size)) == 0:
        raise DataError(
            f"{data_path}: {len(train_set)} training rows cannot feed {context.world_size} ranks; "
            "add data or lower --max_seq_len"
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
    # Worker seeds come from this generator, not the global RNG, so creating an iterator never
    # shifts the training RNG stream (exact resume).
    loader.generator = torch.Generator().manual_seed(args.seed + context.rank)
    return TrainingData(
        loader,
        sampler,
        validation_loader(cache, val_ids, dataset_class, args, context),
        tokenizer_dir,
        data_path,
        cache.data_digest,
        len(train_set),
    )


def validation_loader(cache, val_ids, dataset_class, args, context) -> Optional[DataLoader]:
    if not len(val_ids):
        return None
    try:
        val_set = dataset_class(cache, val_ids, args.max_seq_len)
    except DataError:  # held-out documents too short for one row: evaluate nothing
        return None
    val_sampler = ResumableSampler(
        len(val_set), args.seed, 0, context.rank, context.world_size, shuffle=False
    )
    if not len(val_sampler):
        return None
    loader = make_dataloader(val_set, args.batch_size, val_sampler)
    loader.generator = torch.Generator().manual_seed(args.seed)
    return loader
