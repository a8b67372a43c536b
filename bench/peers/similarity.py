"""Is a peer computing our embedding? Cosine similarity of its vectors to ours, sentence by sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_COSINE = 0.999
"""A peer is measured only when every checked sentence's embedding is at least this close to ours."""


class SimilarityError(ValueError):
    """The peer's embeddings are not ours (shape or direction); the message gives the numbers."""


def cosines(ours: np.ndarray[Any, Any], theirs: np.ndarray[Any, Any]) -> list[float]:
    """Cosine similarity of each row of ``theirs`` to the same row of ``ours``."""
    if ours.ndim != 2 or ours.shape != theirs.shape:
        raise SimilarityError(f"expected embeddings of shape {list(ours.shape)}, got {list(theirs.shape)}")
    a = ours.astype(np.float64)
    b = theirs.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if np.any(norms == 0) or not np.all(np.isfinite(b)):
        raise SimilarityError("a zero or non-finite embedding")
    return [float(x) for x in np.sum(a * b, axis=1) / norms]


def check_embeddings(
    ours: np.ndarray[Any, Any], theirs: np.ndarray[Any, Any], minimum: float = MIN_COSINE
) -> list[float]:
    """The per-sentence cosines, or SimilarityError when one is below ``minimum``."""
    found = cosines(ours, theirs)
    worst = min(found)
    if worst < minimum:
        raise SimilarityError(
            f"its embeddings differ from ours: cosine {worst:.4f} < {minimum} (per sentence: "
            + ", ".join(f"{c:.4f}" for c in found)
            + ")"
        )
    return found
