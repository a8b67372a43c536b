"""The kept tokens of a tokenized text (core/tokens.py): read as its ``Encoding`` reads, without the overflow."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from onnxserve.core.pipeline import truncated_count
from onnxserve.core.tokens import KeptBatch, KeptBuilder, compact, token_counts

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "what", "is", "the", "answer", "it", "forty", "two", "!", "é"]
MAX_LENGTH = 12


def _tokenizer() -> Tokenizer:
    """A word-level BERT-like tokenizer (special tokens, pairs, truncation at ``MAX_LENGTH``), made in memory."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tokenizer.enable_truncation(MAX_LENGTH)
    return tokenizer


ATTRIBUTES = ("ids", "type_ids", "attention_mask", "special_tokens_mask", "offsets", "sequence_ids", "tokens")


@pytest.mark.parametrize(
    "texts",
    [
        ["what is the answer", "it is forty two !"],  # nothing lost
        ["what is the answer " * 20, "é ! unknown"],  # the first loses tokens (overflow), the second does not
        [("what is the answer", "it is forty two ! " * 5)],  # a question and its context, cut
        [""],
    ],
)
def test_kept_tokens_read_as_the_encoding_reads_and_say_whether_tokens_were_lost(texts: list[object]) -> None:
    encodings = _tokenizer().encode_batch(texts)
    kept = compact(encodings)
    for encoding, tokens in zip(encodings, kept, strict=True):
        for name in ATTRIBUTES:
            assert getattr(tokens, name) == getattr(encoding, name), name
        assert bool(tokens.overflowing) == bool(encoding.overflowing)
        assert len(tokens.ids) == len(encoding) <= MAX_LENGTH
    assert truncated_count(kept) == truncated_count(encodings)
    assert truncated_count(kept, frozenset({0})) == truncated_count(encodings, frozenset({0}))


def test_without_positions_only_the_token_tensors_are_kept() -> None:
    (encoding,) = _tokenizer().encode_batch(["what is the answer " * 20])
    kept = compact([encoding], positions=False)[0]
    assert (kept.ids, kept.type_ids, kept.attention_mask) == (encoding.ids, encoding.type_ids, encoding.attention_mask)
    assert kept.overflowing
    for name in ("offsets", "tokens", "sequence_ids", "special_tokens_mask"):
        with pytest.raises(AttributeError, match="without their positions"):
            getattr(kept, name)


@pytest.mark.parametrize("positions", [True, False])
def test_kept_tokens_made_in_slices_read_as_the_encodings_and_slice_without_copies(positions: bool) -> None:
    tokenizer = _tokenizer()
    texts = [*("what is the answer " * n for n in range(5)), "!", "", "it is forty two " * 9, "é"] * 7
    builder = KeptBuilder(positions)
    for start in range(0, len(texts), 4):  # slices of four texts, as a sliced request is tokenized
        builder.add(tokenizer.encode_batch(texts[start : start + 4]))
    kept = builder.build()
    encodings = tokenizer.encode_batch(texts)
    assert len(kept) == len(encodings)
    names = ATTRIBUTES if positions else ("ids", "type_ids", "attention_mask")
    for start, stop in [(0, len(texts)), (3, 11), (6, 7), (10, 10), (-5, len(texts))]:
        part = kept[start:stop]
        assert isinstance(part, KeptBatch)
        assert len(part) == len(encodings[start:stop])
        assert token_counts(part) == [len(e) for e in encodings[start:stop]]
        for tokens, encoding in zip(part, encodings[start:stop], strict=True):
            for name in names:
                assert getattr(tokens, name) == getattr(encoding, name), name
            assert bool(tokens.overflowing) == bool(encoding.overflowing)
    assert truncated_count(kept) == truncated_count(encodings)
    assert kept[-1].ids == encodings[-1].ids
    with pytest.raises(IndexError):
        kept[len(texts)]


def test_a_text_costs_tens_of_bytes_kept_not_an_object_and_a_table_of_its_own() -> None:
    """A request of very many one-character texts held about 0.5 KB per text as one table per text."""
    encodings = _tokenizer().encode_batch(["!"] * 20_000)
    kept = compact(encodings, positions=False)
    held = sum(table.nbytes for table, _ in kept._parts) + kept._starts.nbytes + kept._lost.nbytes
    assert held / len(kept) < 64  # three tokens of 12 bytes and the text's place
