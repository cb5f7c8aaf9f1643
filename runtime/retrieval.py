"""The Q-Former's text side: ITC features, ITM, and two-step retrieval (ITC over every candidate, ITM re-rank
of the top k), numpy only.

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

from runtime.errors import Blip2EdgeError, PromptError
from runtime.text import QFormerTokenizer
from runtime.vision import chunks


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


def check_texts(texts: list, what: str) -> list[str]:
    """`texts` as a list of non-empty strings, or a PromptError naming the bad one."""
    if not texts:
        raise PromptError(f"no {what} given; pass one string or a list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"{what}[{i}] is {'empty' if isinstance(t, str) else type(t).__name__}; "
                              f"every text must be a non-empty string")
    return list(texts)


def _softmax_match(logits: np.ndarray) -> np.ndarray:
    """ITM logits [N, 2] -> probability of 'match' [N] (float64 softmax, float32 result)."""
    logits = logits.astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e[:, 1] / e.sum(-1)).astype(np.float32)


class QFormerText:
    """ITC text features (unimodal graph), ITM and question-aware queries (bi-directional graph), retrieval."""

    def __init__(self, manifest, runners: dict, encoder):
        self.encoder, self.max_batch = encoder, manifest.limits.max_batch
        self.tokenizer = QFormerTokenizer.from_manifest(manifest)
        self.text, self.itm = runners.get("qformer_text"), runners.get("qformer_itm")

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[T, D] unit vectors: the normalised [CLS] projection of each text."""
        out = []
        for part in chunks(len(texts), self.max_batch):
            ids, mask = self.tokenizer.encode_texts(texts[part])
            out.append(self.text.run({"input_ids": ids, "attention_mask": mask})["text_feat"])
        return np.concatenate(out)

    def itm_outputs(self, image_embeds: np.ndarray, texts: list[str]) -> dict[str, np.ndarray]:
        """The bi-directional graph on (image, text) pairs: itm_logits, text-conditioned query_output and, for
        stage 2, llm_prompt."""
        parts = []
        for part in chunks(len(texts), self.max_batch):
            ids, mask = self.tokenizer.encode_texts(texts[part])
            parts.append(self.itm.run({"image_embeds": image_embeds[part], "input_ids": ids, "attention_mask": mask}))
        return {n: np.concatenate([p[n] for p in parts]) for n in self.itm.output_names}

    def itm_probs(self, image_embeds: np.ndarray, texts: list[str]) -> np.ndarray:
        return _softmax_match(self.itm_outputs(image_embeds, texts)["itm_logits"])

    def encode_gallery(self, images: list) -> ImageGallery:
        embeds = self.encoder.embed_images(images)
        return ImageGallery(self.encoder.queries(embeds, ["image_feats"])["image_feats"], embeds)

    def encode_texts(self, texts: list[str]) -> TextGallery:
        return TextGallery(texts, self.embed_texts(texts))

    def search_images(self, text: str, gallery: ImageGallery, k: int, rerank: bool) -> list[Match]:
        k = check_k(k, len(gallery), "image gallery")
        itc = similarity(gallery.feats, self.embed_texts([text]))[:, 0]
        probs = (lambda idx: self.itm_probs(gallery.embeds[idx], [text] * len(idx))) if rerank else None
        return rank(itc, k, probs)

    def search_texts(self, image, texts: TextGallery, k: int, rerank: bool) -> list[Match]:
        k = check_k(k, len(texts), "text gallery")
        query = self.encode_gallery([image])
        itc = similarity(query.feats, texts.feats)[0]
        probs = (lambda idx: self.itm_probs(np.repeat(query.embeds, len(idx), 0), [texts.texts[i] for i in idx])
                 ) if rerank else None
        return rank(itc, k, probs)
