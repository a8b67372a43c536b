"""The kept tokens of a tokenized text (core/tokens.py): read as its ``Encoding`` reads, without the overflow."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from onnxserve.core.pipeline import truncated_count
from onnxserve.core.tokens import KeptTokens, compact

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
    kept = KeptTokens(encoding, positions=False)
    assert (kept.ids, kept.type_ids, kept.attention_mask) == (encoding.ids, encoding.type_ids, encoding.attention_mask)
    assert kept.overflowing
    for name in ("offsets", "tokens", "sequence_ids", "special_tokens_mask"):
        with pytest.raises(AttributeError, match="without their positions"):
            getattr(kept, name)
