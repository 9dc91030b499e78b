"""Data for the training loop: default corpus and tokenizer, the token cache (built once, rank 0
first), the held-out split, packed or padded datasets, the resumable sharded loaders, and the
step count they imply. Wires minimind_fast.data together the way MiniMind's train_pretrain.py
wires PretrainDataset + DistributedSampler.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..corpus import build_default_corpus
from ..data import (DataError, PackedDataset, PaddedDataset, ResumableSampler, build_token_cache, make_dataloader,
                    split_documents)
from ..tokenizer import default_tokenizer_path, tokenizer_file
from . import distributed


def build_data(args, config, context, resumed_from=None):
    """Corpus -> tokenizer -> token cache (built once by rank 0, then opened by the others: only
    rank 0 reads the whole data file to fingerprint it) -> train/val datasets and loaders.
    resumed_from: the checkpoint being resumed; its tokenizer must be the one in use."""
    with distributed.main_rank_first(context):
        data_path = args.data_path or build_default_corpus()
        tokenizer_dir = Path(args.tokenizer_path or default_tokenizer_path(config.vocab_size))
        saved = Path(resumed_from) / "tokenizer.json" if resumed_from is not None else None
        if saved is not None and saved.is_file() and saved.read_bytes() != tokenizer_file(tokenizer_dir).read_bytes():
            raise ValueError(f"the tokenizer {tokenizer_file(tokenizer_dir)} is not the one {resumed_from} was trained "
                             f"with, so token ids would change meaning; pass --tokenizer_path {resumed_from} (its "
                             "copy), or start a new run in another --save_dir")
        if context.is_main:
            cache = build_token_cache(data_path, tokenizer_dir, progress=True)
    digest = distributed.broadcast_object(cache.data_digest if context.is_main else None, context)
    if not context.is_main:  # rank 0's cache on a shared file system; else this node builds its own
        cache = build_token_cache(data_path, tokenizer_dir, progress=False, data_digest=digest)
    tokenizer_dir = tokenizer_file(tokenizer_dir).parent
    if cache.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {cache.vocab_size} tokens but the model's vocab_size "
                         f"is {config.vocab_size}; pass --vocab_size {cache.vocab_size} or a smaller tokenizer")
    train_ids, val_ids = split_documents(cache, args.val_fraction, args.seed)
    dataset_class = PackedDataset if args.packing else PaddedDataset
    train_set = dataset_class(cache, train_ids, args.max_seq_len)
    if len(ResumableSampler(len(train_set), args.seed, 0, 0, context.world_size)) == 0:
        raise DataError(f"{data_path}: {len(train_set)} training rows cannot feed {context.world_size} ranks; "
                        "add data or lower --max_seq_len")
    val_loader = None
    if len(val_ids):
        try:
            val_set = dataset_class(cache, val_ids, args.max_seq_len)
            val_sampler = ResumableSampler(len(val_set), args.seed, 0, context.rank, context.world_size, shuffle=False)
            if len(val_sampler):
                val_loader = make_dataloader(val_set, args.batch_size, val_sampler)
                val_loader.generator = torch.Generator().manual_seed(args.seed)
        except DataError:  # held-out documents too short for one row: evaluate nothing
            pass
    sampler = ResumableSampler(len(train_set), args.seed, 0, context.rank, context.world_size)
    loader = make_dataloader(train_set, args.batch_size, sampler, args.num_workers,
                             pin_memory=context.device.type == "cuda")
    # Worker seeds come from this generator, not the global RNG, so creating an iterator never
    # shifts the training RNG stream (exact resume).
    loader.generator = torch.Generator().manual_seed(args.seed + context.rank)
    return loader, sampler, val_loader, tokenizer_dir


def remaining_steps(num_samples, epoch, consumed, args, world_size) -> int:
    """Optimizer steps left in epochs [epoch, args.epochs) from `consumed` samples into `epoch`."""
    steps = 0
    for e in range(epoch, args.epochs):
        rows = len(ResumableSampler(num_samples, 0, 0, 0, world_size, consumed if e == epoch else 0))
        steps += math.ceil(math.ceil(rows / args.batch_size) / args.accumulation_steps)
    return steps
