"""ITC similarity and two-step retrieval (ITC over every candidate, ITM re-rank of the top k), numpy only.

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_dir("engines/stage1/onnx")
    gallery = pipe.encode_gallery(image_paths)        # runs the image tower once per image
    gallery.save("gallery.npz"); gallery = ImageGallery.load("gallery.npz")
    hits = pipe.retrieve("a red circle on the left", gallery, k=16)   # list[Match], best first

BLIP-2's image-text similarity is the largest dot product between the text's
[CLS] feature and any of the image's query features (all unit vectors).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import Blip2EdgeError


class RetrievalError(Blip2EdgeError, ValueError):
    """A retrieval request that cannot be served (k out of range, empty or mismatched gallery)."""


def similarity(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
    """image_feats [I, Nq, D], text_feats [T, D] -> [I, T]: max over queries of the dot product."""
    images, queries, width = image_feats.shape
    scores = image_feats.reshape(images * queries, width) @ text_feats.T  # [I*Nq, T]
    return scores.reshape(images, queries, -1).max(axis=1)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, largest first (ties: lower index first)."""
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


def check_k(k, count: int, what: str) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise RetrievalError(f"k must be a positive integer, got {k!r}")
    if count == 0:
        raise RetrievalError(f"the {what} is empty; give at least one candidate")
    if k > count:
        raise RetrievalError(f"k={k} is larger than the {what} ({count} candidates); ask for k <= {count}")
    return int(k)


@dataclass
class Match:
    index: int  # position in the candidates
    itc: float  # ITC similarity (max over queries of the cosine)
    itm: float | None  # ITM match probability (None without re-ranking)


@dataclass
class ImageGallery:
    """Encoded candidate images: ITC features for the first step, image embeddings for ITM re-ranking."""
    feats: np.ndarray  # [N, Nq, D] unit vectors
    embeds: np.ndarray  # [N, Np, Dv] vision outputs

    def __len__(self) -> int:
        return len(self.feats)

    def save(self, path) -> None:
        np.savez(Path(path), feats=self.feats, embeds=self.embeds)

    @classmethod
    def load(cls, path) -> "ImageGallery":
        try:
            data = np.load(Path(path))
            return cls(data["feats"], data["embeds"])
        except (OSError, KeyError, ValueError) as e:
            raise RetrievalError(f"could not read the gallery {path} ({e}); write it with ImageGallery.save") from None


@dataclass
class TextGallery:
    """Encoded candidate texts for image -> text retrieval."""
    texts: list[str]
    feats: np.ndarray  # [N, D] unit vectors

    def __len__(self) -> int:
        return len(self.texts)


def rank(itc: np.ndarray, k: int, itm_probs=None) -> list[Match]:
    """ITC top-k; when `itm_probs(indices) -> probs` is given, re-rank those k by ITM (stable on ties)."""
    top = top_k(itc, k)
    if itm_probs is None:
        return [Match(int(i), float(itc[i]), None) for i in top]
    probs = np.asarray(itm_probs(top))
    order = np.argsort(-probs, kind="stable")
    return [Match(int(top[j]), float(itc[top[j]]), float(probs[j])) for j in order]
