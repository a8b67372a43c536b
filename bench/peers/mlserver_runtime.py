"""An MLServer 1.7 runtime for the demo MiniLM: tokenizers + ONNX Runtime + masked mean pooling, L2-normalized.

It computes what onnxserve's ``embedding`` output computes (and bench/torchserve/handler.py does with
PyTorch). Each request carries one text (V2 BYTES ``text``, shape [1]); MLServer's adaptive batching
merges requests into one ``[n]`` input, which is tokenized together (padded to its longest) and run as
one batch; MLServer splits the ``[n, 384]`` answer back per request.

This file runs inside MLServer's processes (bench/.venv-mlserver), so it imports nothing from bench/.
Its settings come from model-settings.json: ``parameters.uri`` (the folder holding ``model.onnx`` and
``tokenizer.json``) and ``parameters.extra``: ``threads`` (ONNX Runtime intra-op threads, 0: all
cores) and ``max_length``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel  # type: ignore[import-not-found, unused-ignore]
from mlserver.codecs import NumpyCodec, StringCodec  # type: ignore[import-not-found, unused-ignore]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found, unused-ignore]
from mlserver.utils import get_model_uri  # type: ignore[import-not-found, unused-ignore]
from tokenizers import Tokenizer


class MiniLMRuntime(MLModel):  # type: ignore[misc, unused-ignore]
    async def load(self) -> bool:
        folder = Path(await get_model_uri(self._settings))
        extra: dict[str, Any] = dict(self._settings.parameters.extra or {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("threads", 0))
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=int(extra.get("max_length", 256)))
        self.tokenizer.enable_padding()
        self.input_names = {i.name for i in self.session.get_inputs()}
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = StringCodec.decode_input(payload.inputs[0])
        encoded = self.tokenizer.encode_batch([str(t) for t in texts])
        mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {
            "input_ids": np.asarray([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": mask,
            "token_type_ids": np.asarray([e.type_ids for e in encoded], dtype=np.int64),
        }
        hidden = self.session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in self.input_names})[0]
        weights = mask[:, :, None].astype(hidden.dtype)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("embedding", pooled.astype(np.float32))]
        )
