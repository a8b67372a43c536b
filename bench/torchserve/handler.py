"""A plain PyTorch TorchServe handler for all-MiniLM-L6-v2: tokenizer + AutoModel + mean pooling.

It computes what sentence-transformers (and onnxserve's ``embedding`` output) compute: the
attention-masked mean of the last hidden state, L2-normalized. Each request's body is one text; a
TorchServe batch of requests is tokenized together (padded to its longest) and run as one batch.

This file runs inside TorchServe's Python worker (it is packed into the model archive), so it
imports nothing from bench/. Its settings come from the archive's model-config.yaml ``handler``
section: ``model_path`` (the Hugging Face folder), ``threads`` (torch intra-op threads) and
``max_length``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler  # type: ignore[import-untyped]

log = logging.getLogger(__name__)


class SentenceEmbeddingHandler(BaseHandler):  # type: ignore[misc]
    def initialize(self, context: Any) -> None:
        settings: dict[str, Any] = dict((context.model_yaml_config or {}).get("handler", {}))
        threads = int(settings.get("threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        model_path = str(settings["model_path"])
        self.max_length = int(settings.get("max_length", 256))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()
        self.initialized = True
        log.info("loaded %s with %d torch threads", model_path, torch.get_num_threads())

    def preprocess(self, data: list[dict[str, Any]]) -> list[str]:
        texts: list[str] = []
        for row in data:
            body = row.get("data")
            if body is None:
                body = row.get("body")
            texts.append(body.decode("utf-8") if isinstance(body, bytes | bytearray) else str(body))
        return texts

    def inference(self, data: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        encoded = self.tokenizer(data, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def postprocess(self, data: torch.Tensor) -> list[list[float]]:
        rows: list[list[float]] = data.tolist()
        return rows
