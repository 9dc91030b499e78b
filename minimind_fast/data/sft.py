"""SFT data in one import: conversations -> ChatML ids and loss mask -> SFT cache -> rows.

    cache = build_sft_cache("sft_mini_512.jsonl", tokenizer_dir)       # once; reused afterwards
    train_ids, val_ids = split_documents(cache, val_fraction=0.01, seed=42)
    dataset = SFTPackedDataset(cache, train_ids, max_seq_len=512)     # or SFTPaddedDataset
    sampler = ResumableSampler(len(dataset), seed=42, epoch=0, rank=rank, world_size=world)
    loader = make_dataloader(dataset, batch_size, sampler)
    for batch in loader: ...  # {"input_ids", "labels", "segment_ids" (packed only)}: (B, T) int64

With no data file, `minimind_fast.corpus_sft.build_default_sft_set()` writes a train.jsonl and
a held-out val.jsonl of questions about the standard library. `ChatTemplateEncoder.encode_prompt`
gives the ids to generate a reply from; `answer_scores` rates generated answers.

Module map: sft_format (JSONL reader, validation), sft_template (ids and mask), sft_cache,
sft_datasets (truncation, packing, document mask), sft_metrics (token F1, ROUGE-L).
"""

from .datasets import split_documents
from .sft_cache import SFT_CACHE_FORMAT_VERSION, SFTCache, build_sft_cache
from .sft_datasets import SFTPackedDataset, SFTPaddedDataset, kept_lengths, pack_best_fit
from .sft_format import (
    ROLES,
    SFT_FORMAT_HINT,
    check_sft_data_path,
    conversation_problem,
    iter_conversations,
    to_messages,
)
from .sft_metrics import answer_scores, rouge_l, token_f1
from .sft_template import ChatTemplateEncoder, EncodedConversation

__all__ = [
    "SFTCache",
    "build_sft_cache",
    "SFT_CACHE_FORMAT_VERSION",
    "split_documents",
    "SFTPackedDataset",
    "SFTPaddedDataset",
    "kept_lengths",
    "pack_best_fit",
    "ROLES",
    "SFT_FORMAT_HINT",
    "check_sft_data_path",
    "conversation_problem",
    "iter_conversations",
    "to_messages",
    "answer_scores",
    "rouge_l",
    "token_f1",
    "ChatTemplateEncoder",
    "EncodedConversation",
]
