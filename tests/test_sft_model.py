"""The document mask of packed SFT rows through the model: a packed conversation sees only
itself (its logits equal those of the conversation run alone), no mask keeps plain causal
attention, and misuse of segment_ids is a one-line error."""

import pytest
import torch
from helpers import assert_close
from interop_helpers import tiny_config, tiny_model

from minimind_fast.constants import BOS_TOKEN_ID
from minimind_fast.layers import document_causal_mask
from minimind_fast.train.optim import apply_grad_checkpointing


def test_document_causal_mask():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = document_causal_mask(segments)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for query in range(6):
        for key in range(query + 1):
            expected[query, key] = segments[0, query] == segments[0, key]
    assert torch.equal(mask[0, 0], expected)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return tiny_model(tiny_config(num_hidden_layers=3))


def packed_row(lengths, vocab, seed=0):
    """(input_ids (1, T), segment_ids (1, T), [(start, end)] per conversation)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=generator)
    segments, spans, start = [], [], 0
    for index, length in enumerate(lengths):
        segments += [index] * length
        spans.append((start, start + length))
        start += length
    return ids, torch.tensor([segments]), spans


def test_packed_conversation_equals_the_conversation_alone(model):
    ids, segments, spans = packed_row([7, 11, 5], model.config.vocab_size)
    packed = model(ids, segment_ids=segments).logits
    for start, end in spans:
        alone = model(ids[:, start:end]).logits
        assert_close(packed[:, start:end], alone, atol=2e-5, rtol=2e-5, what=f"span {start}:{end}")
    # without the mask the later conversations see the earlier ones (the test above can fail)
    unmasked = model(ids).logits
    start, end = spans[1]
    assert (unmasked[:, start:end] - packed[:, start:end]).abs().max() > 1e-2


def test_loss_and_gradients_of_a_packed_row_equal_separate_rows(model):
    lengths = [9, 6]
    ids, segments, spans = packed_row(lengths, model.config.vocab_size, seed=1)
    labels = ids.clone()
    labels[:, spans[1][0]] = -100  # a conversation's first token is never a target
    model.zero_grad()
    packed = model(ids, labels=labels, segment_ids=segments).loss
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = sum(model(ids[:, s:e], labels=labels[:, s:e]).loss * (e - s - 1) for s, e in spans)
    (total / (sum(lengths) - len(lengths))).backward()
    assert_close(packed.detach(), (total / (sum(lengths) - len(lengths))).detach(), 1e-5, 1e-5)
    for packed_grad, param in zip(packed_grads, model.parameters()):
        assert_close(packed_grad, param.grad, atol=1e-5, rtol=1e-4, what="gradient")
    model.zero_grad()


def test_one_segment_equals_plain_causal_attention(model):
    ids, _, _ = packed_row([13], model.config.vocab_size, seed=2)
    plain = model(ids).logits
    masked = model(ids, segment_ids=torch.zeros_like(ids)).logits
    assert_close(masked, plain, atol=1e-5, rtol=1e-5)


def test_no_mask_takes_the_is_causal_fast_path(model, monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids, segments, _ = packed_row([4, 4], model.config.vocab_size)
    model(ids)
    assert calls and all(calls_ == (True, True) for calls_ in calls)
    calls.clear()
    model(ids, segment_ids=segments)
    assert calls and all(calls_ == (False, False) for calls_ in calls)


def test_grad_checkpointing_passes_the_mask(model):
    torch.manual_seed(3)
    config = tiny_config(num_hidden_layers=2)
    reference = tiny_model(config).train()
    checkpointed = tiny_model(config).train()
    checkpointed.load_state_dict(reference.state_dict())
    apply_grad_checkpointing(checkpointed)
    ids, segments, _ = packed_row([5, 8], config.vocab_size, seed=4)
    for network in (reference, checkpointed):
        network(ids, labels=ids, segment_ids=segments).loss.backward()
    for a, b in zip(reference.parameters(), checkpointed.parameters()):
        assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["shape", "cache"])
def test_segment_ids_misuse_is_one_line_error(model, case):
    ids, segments, _ = packed_row([4, 4], model.config.vocab_size)
    if case == "shape":
        kwargs = dict(segment_ids=segments[:, :-1])
    else:
        past = model(ids[:, :4], use_cache=True).past_key_values
        ids, kwargs = ids[:, 4:], dict(segment_ids=segments[:, 4:], past_key_values=past)
    with pytest.raises(ValueError, match="segment_ids of shape"):
        model(ids, **kwargs)


def test_packed_dataset_rows_through_the_model_equal_each_conversation_alone(tmp_path):
    from sft_helpers import random_conversations, train_small_tokenizer, write_jsonl

    from minimind_fast.data.sft import SFTPackedDataset, build_sft_cache

    tokenizer_dir = train_small_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "chats.jsonl", random_conversations(12, seed=7, turns=1))
    cache = build_sft_cache(data, tokenizer_dir, cache_dir=tmp_path / "cache", progress=False)
    dataset = SFTPackedDataset(cache, None, max_seq_len=96)
    row = max((dataset[i] for i in range(len(dataset))), key=lambda r: int(r["segment_ids"].max()))
    segments = row["segment_ids"]
    assert int(segments.max()) >= 2  # two conversations and the padded tail at least
    torch.manual_seed(5)
    network = tiny_model(tiny_config(vocab_size=cache.vocab_size, max_position_embeddings=96))
    packed = network(row["input_ids"][None], segment_ids=segments[None]).logits[0]
    for segment in range(int(segments.max())):  # the last segment may be padding
        where = torch.nonzero(segments == segment).flatten()
        ids = row["input_ids"][where]
        assert int(ids[0]) == BOS_TOKEN_ID  # a whole conversation
        alone = network(ids[None]).logits[0]
        assert_close(packed[where], alone, atol=2e-5, rtol=2e-5, what=f"segment {segment}")


@pytest.mark.slow  # torch.compile on CPU takes tens of seconds
def test_compiled_model_takes_the_mask(model):
    ids, segments, _ = packed_row([6, 9], model.config.vocab_size, seed=6)
    compiled = torch.compile(model, fullgraph=True)
    eager = model(ids, labels=ids, segment_ids=segments).loss
    assert_close(compiled(ids, labels=ids, segment_ids=segments).loss, eager, 1e-5, 1e-5)
