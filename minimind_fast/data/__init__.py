"""Data pipeline: streaming reader -> one-time token cache (memmap) -> packed/padded datasets ->
deterministic resumable DDP sampler -> DataLoader; and the tokenizer they share.

    cache = build_token_cache("pretrain_hq.jsonl", tokenizer_dir)       # once; reused afterwards
    train_ids, val_ids = split_documents(cache, val_fraction=0.01, seed=42)
    dataset = PackedDataset(cache, train_ids, max_seq_len=512)          # or PaddedDataset
    sampler = ResumableSampler(len(dataset), seed=42, epoch=0, rank=rank, world_size=world,
                               consumed=step * batch_size * world)
    loader = make_dataloader(dataset, batch_size, sampler, num_workers=2)
    for batch in loader: ...  # {"input_ids": (B, T), "labels": (B, T)} int64

Modules, each importing only those before it: errors, reader, tokenizer, encoding, cache,
datasets, sampler. Follows MiniMind's dataset/lm_dataset.py for the data format and the padded
rows, nanoGPT's memmapped token file for the cache.
"""

from .cache import CACHE_FORMAT_VERSION, MIN_DOC_TOKENS, TokenCache, build_token_cache, token_dtype
from .datasets import PackedDataset, PaddedDataset, split_documents
from .encoding import ADD_SPECIAL_TOKENS, LITERAL_SPECIAL_TOKENS
from .errors import DataError
from .reader import SkipStats, check_data_path, iter_documents, iter_jsonl_records
from .sampler import ResumableSampler, collate, count_tokens, epoch_order, make_dataloader

__all__ = [
    "DataError",
    "TokenCache",
    "build_token_cache",
    "split_documents",
    "PackedDataset",
    "PaddedDataset",
    "ResumableSampler",
    "make_dataloader",
    "collate",
    "count_tokens",
    "epoch_order",
    "token_dtype",
    "check_data_path",
    "iter_documents",
    "iter_jsonl_records",
    "SkipStats",
    "MIN_DOC_TOKENS",
    "CACHE_FORMAT_VERSION",
    "ADD_SPECIAL_TOKENS",
    "LITERAL_SPECIAL_TOKENS",
]
