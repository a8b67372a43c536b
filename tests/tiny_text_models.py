"""A tiny random BERT (2 layers, hidden size 32) whose vocabulary covers the optimizer's sample
sentences, exported by onnxserve's own exporter: a real text model folder in a few seconds."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from onnxserve.toolkit.export.huggingface import HfExportOptions, export_huggingface
from onnxserve.toolkit.samples import SENTENCES


def vocabulary(extra: Sequence[str] = ()) -> list[str]:
    """The special tokens, every word of the optimizer's sample sentences, and ``extra`` words."""
    words = {w for s in SENTENCES for w in re.findall(r"\w+|[^\w\s]", s.lower())} | set(extra)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


def tiny_bert_folder(
    folder: Path, words: Sequence[str] = (), layers: int = 2, heads: int = 2, positions: int = 64
) -> Path:
    """A Hugging Face folder: a randomly initialised BertModel and its WordPiece tokenizer (whose
    vocabulary is ``vocabulary(words)``); ``heads`` and ``positions`` (its max sequence length) set how
    much memory its attention takes."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    assert tokenizer.convert_tokens_to_ids(vocab[-1]) != tokenizer.unk_token_id, "the vocabulary did not load"
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=positions,
    )
    BertModel(config).eval().save_pretrained(str(folder))
    return folder


def tiny_bert_version(
    root: Path, version: str = "tiny/1", layers: int = 2, heads: int = 2, positions: int = 64
) -> Path:
    """``root/VERSION``: the tiny BERT (``tiny_bert_folder``, made in ``root/hf``) exported for
    feature-extraction with mean pooling."""
    source = tiny_bert_folder(root / "hf", layers=layers, heads=heads, positions=positions)
    target = root / version
    export_huggingface(source, target, HfExportOptions(task="feature-extraction", pooling="mean"))
    return target
