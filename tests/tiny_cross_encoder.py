"""A tiny BERT cross-encoder (one relevance logit), trained for a few seconds on a toy retrieval set so
that its ranking means something, saved as a Hugging Face folder that sentence-transformers'
``CrossEncoder`` loads as it is."""

from __future__ import annotations

from pathlib import Path

import tiny_text_models

TOPICS = {
    "animals": ["the quick brown fox jumps over the lazy dog .", "a lazy dog sleeps .", "the brown fox runs ."],
    "serving": ["onnx runtime serves this model .", "the server serves models fast .", "onnx models run well ."],
    "text": ["a sentence maps text to a vector .", "embeddings map text .", "a text is a sentence ."],
}
QUERIES = {
    "animals": ["which animal jumps ?", "fox and dog", "lazy dog"],
    "serving": ["what serves the model ?", "onnx runtime", "fast server"],
    "text": ["what maps text ?", "sentence vector", "text embeddings"],
}
WORDS = sorted({w for group in (*TOPICS.values(), *QUERIES.values()) for s in group for w in s.split()})


def training_pairs() -> tuple[list[tuple[str, str]], list[float]]:
    """Every query against every text: relevant (1) within its topic, irrelevant (0) across topics."""
    pairs, labels = [], []
    for topic, queries in QUERIES.items():
        for query in queries:
            for other, texts in TOPICS.items():
                for text in texts:
                    pairs.append((query, text))
                    labels.append(1.0 if other == topic else 0.0)
    return pairs, labels


def tiny_cross_encoder(folder: Path, steps: int = 80, num_labels: int = 1) -> Path:
    """``folder``: a trained tiny BertForSequenceClassification cross-encoder and its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tiny_text_models.tiny_bert_folder(folder, WORDS)  # the vocabulary and tokenizer files
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config)
    pairs, labels = training_pairs()
    batch = tokenizer([q for q, _ in pairs], [t for _, t in pairs], padding=True, return_tensors="pt")
    target = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        logits = model(**batch).logits
        if num_labels == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target)
        else:
            loss = torch.nn.functional.cross_entropy(logits, target.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
