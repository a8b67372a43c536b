"""Tiny random encoders of every architecture onnxserve's exporter takes (BERT, RoBERTa, XLM-RoBERTa,
ELECTRA, ALBERT, MPNet, DistilBERT), built from configs with a small hidden size but the width ratios of
a real sentence encoder (the demo MiniLM's: head size 32, feed-forward 4 x hidden), given the WordPiece
tokenizer of ``tiny_text_models`` and exported by onnxserve's own exporter; and their ``optimize --fuse``
forms (``toolkit.fusion.fuse``, what the command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

import tiny_text_models
from onnxserve.toolkit.export.huggingface import HfExportOptions, export_huggingface
from onnxserve.toolkit.fusion import fuse

ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "electra", "albert", "mpnet", "distilbert")
HIDDEN, HEADS, FEED_FORWARD, LAYERS = 128, 4, 512, 1
POSITIONS = 512


def _config(architecture: str, vocabulary: int) -> Any:
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocabulary,
        "pad_token_id": 0,  # the WordPiece tokenizer's [PAD]
        "max_position_embeddings": POSITIONS + 2,  # RoBERTa's positions start after the padding index
    }
    if architecture == "distilbert":
        return transformers.DistilBertConfig(
            dim=HIDDEN, n_heads=HEADS, hidden_dim=FEED_FORWARD, n_layers=LAYERS, **common
        )
    common.update(
        hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FEED_FORWARD, num_hidden_layers=LAYERS
    )
    if architecture == "albert":
        return transformers.AlbertConfig(embedding_size=HIDDEN // 2, **common)
    if architecture == "electra":
        return transformers.ElectraConfig(embedding_size=HIDDEN, **common)
    classes = {
        "bert": transformers.BertConfig,
        "roberta": transformers.RobertaConfig,
        "xlm-roberta": transformers.XLMRobertaConfig,
        "mpnet": transformers.MPNetConfig,
    }
    return classes[architecture](**common)


def tiny_encoder_version(root: Path, architecture: str) -> Path:
    """``root/ARCHITECTURE/plain/1``: a tiny random ``architecture`` exported for feature-extraction."""
    import torch
    import transformers

    folder = tiny_text_models.tiny_bert_folder(root / architecture / "hf", positions=POSITIONS)
    for name in ("config.json", "model.safetensors"):  # the tokenizer stays; the BERT gives way
        (folder / name).unlink(missing_ok=True)
    torch.manual_seed(0)
    config = _config(architecture, len(tiny_text_models.vocabulary()))
    transformers.AutoModel.from_config(config).eval().save_pretrained(str(folder))
    version = root / architecture / "plain" / "1"
    export_huggingface(folder, version, HfExportOptions(task="feature-extraction", pooling="mean"))
    return version


def fused_version(plain: Path) -> Path:
    """``plain``'s model with the transformer fusions of ``optimize --fuse``, in a sibling ``fused/1``."""
    fused, _, _ = fuse(onnx.load(str(plain / "model.onnx")))
    version = plain.parent.parent / "fused" / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(fused, str(version / "model.onnx"))
    return version
