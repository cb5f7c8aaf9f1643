"""The Q-Former's text side: ITC features, ITM, and two-step retrieval (ITC over every candidate, ITM re-rank
of the top k), numpy only.

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_dir("engines/stage1/onnx")
    gallery = pipe.encode_gallery(image_paths)        # runs the image tower once per image
    gallery.save("gallery/"); gallery = ImageGallery.load("gallery/")   # features, embeddings, index
    hits = pipe.retrieve("a red circle on the left", gallery, k=16)   # list[Match], best first

BLIP-2's image-text similarity is the largest dot product between the text's
[CLS] feature and any of the image's query features (all unit vectors).
"""
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import Blip2EdgeError, PromptError
from runtime.index import FaissIndex, build_index, faiss_available, one_blas_thread, similarity, top_k
from runtime.ort_runner import float16_to_float32
from runtime.text import QFormerTokenizer
from runtime.vision import chunks


GALLERY_FORMAT = 1  # the layout of a saved gallery folder (gallery.json "format")


class RetrievalError(Blip2EdgeError, ValueError):
    """A retrieval request that cannot be served (k out of range, empty or mismatched gallery)."""


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


class ImageGallery:
    """Encoded candidate images: ITC features, searched through an index (runtime.index: FAISS when installed),
    and the image embeddings (ViT outputs) that ITM re-ranks the top k from.

    `save(folder)` writes the features (float32), the embeddings (float16 by default: half the disk, and ITM
    reads only the k rows a query re-ranks) and the index; `load(folder)` memory-maps both arrays, so a gallery
    larger than memory is searched without reading it in (the exact path and the index's re-scoring read the
    pages they touch; FAISS holds its own copy of the vectors). The ViT outputs are kept rather than computed
    again from the image files at query time: re-ranking k = 128 candidates would run the image tower 128 times
    per query."""

    def __init__(self, feats: np.ndarray, embeds: np.ndarray, index=None):
        if len(feats) != len(embeds):
            raise RetrievalError(f"{len(feats)} feature rows but {len(embeds)} image embeddings; encode the gallery "
                                 f"with Blip2Pipeline.encode_gallery")
        self.feats, self.embeds, self._index = feats, embeds, index  # [N, Nq, D] unit vectors; [N, Np, Dv]

    def __len__(self) -> int:
        return len(self.feats)

    @property
    def index(self):
        """The search index, built on first use (FAISS flat or IVF, or exact numpy without FAISS)."""
        if self._index is None:
            self._index = build_index(self.feats)
        return self._index

    def search(self, text_feat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, ITC scores) of the k images most similar to one text feature [D], best first."""
        return self.index.search(text_feat, k)

    def extend(self, other: "ImageGallery") -> "ImageGallery":
        """This gallery followed by `other` (encoded in parts: images keep their order); the index is added to
        when it is a FAISS index already built, else built on first search. Returns the new gallery (this one is
        left as it is): `gallery = gallery.extend(pipe.encode_gallery(more_paths))`."""
        if not isinstance(other, ImageGallery):
            raise RetrievalError(f"extend takes an ImageGallery, not {type(other).__name__}; encode the images first: "
                                 f"gallery = gallery.extend(pipe.encode_gallery(more_paths))")
        feats = np.concatenate([self.feats, other.feats])
        index = self._index
        if isinstance(index, FaissIndex) and index.kind == "ivf":
            index.add(other.feats, feats)
        else:
            index = None  # flat or exact: rebuilt on first search (it may now be large enough for IVF)
        return ImageGallery(feats, np.concatenate([self.embeds, other.embeds]), index)

    def save(self, folder, embeds_dtype: str = "float16") -> None:
        """Write the gallery to `folder` (a new folder: features, embeddings, index, gallery.json), atomically."""
        folder = Path(folder)
        if folder.exists():
            raise RetrievalError(f"{folder} exists; save the gallery to a new folder (or remove that one)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        # (a name of its own: two saves at once each write their own; the last complete one wins the rename)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
        try:
            np.save(tmp / "feats.npy", np.asarray(self.feats, dtype=np.float32))
            np.save(tmp / "embeds.npy", np.asarray(self.embeds, dtype=embeds_dtype))
            meta = {"format": GALLERY_FORMAT, "images": len(self), "index": self.index.describe()}
            if isinstance(self.index, FaissIndex):
                self.index.save(tmp / "index.faiss")
            (tmp / "gallery.json").write_text(json.dumps(meta, indent=1))
            for attempt in range(100):  # another save that got there first is replaced with this complete one
                try:
                    tmp.rename(folder)
                    break
                except OSError:
                    if attempt == 99:
                        raise RetrievalError(f"could not write {folder}: other saves kept replacing it") from None
                    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
                    try:
                        folder.rename(old / "gallery")
                    except OSError:  # (moved aside by the other save meanwhile)
                        pass
                    finally:
                        shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, folder) -> "ImageGallery":
        """A gallery `save` wrote; RetrievalError naming the file for anything else (another format version, files
        of different galleries, an index of other features, a corrupt file). Arrays are memory-mapped, never
        unpickled."""
        folder = Path(folder)
        fix = "encode the gallery again and write it with ImageGallery.save"
        readers = {"gallery.json": lambda p: json.loads(p.read_text()),
                   "feats.npy": lambda p: np.load(p, mmap_mode="r"),
                   "embeds.npy": lambda p: np.load(p, mmap_mode="r")}
        read = {}
        for name, reader in readers.items():
            try:
                read[name] = reader(folder / name)
            except (OSError, ValueError, RecursionError) as e:
                raise RetrievalError(f"could not read {folder / name} ({type(e).__name__}: {e}); {fix}") from None
        meta, feats, embeds = read.values()
        if not isinstance(meta, dict) or meta.get("format") != GALLERY_FORMAT:
            version = meta.get("format") if isinstance(meta, dict) else None
            raise RetrievalError(f"{folder / 'gallery.json'} has format {version!r}, this runtime reads format "
                                 f"{GALLERY_FORMAT}; {fix} with this version of blip2-edge")
        if feats.ndim != 3 or embeds.ndim != 3 or len(feats) != len(embeds) or len(feats) != meta.get("images"):
            raise RetrievalError(f"{folder}: feats.npy {list(feats.shape)} and embeds.npy {list(embeds.shape)} are "
                                 f"not the [images, queries, width] arrays of the {meta.get('images')} images "
                                 f"gallery.json lists; {fix}")
        index = None
        if (folder / "index.faiss").exists() and faiss_available():
            described = meta.get("index")
            try:
                index = FaissIndex.load(folder / "index.faiss", feats, described if isinstance(described, dict) else {})
            except (RuntimeError, ValueError, TypeError, AttributeError) as e:
                raise RetrievalError(f"{folder / 'index.faiss'} is not a FAISS index FAISS can read ({e}); "
                                     f"{fix}") from None
            if index.index.ntotal != feats.shape[0] * feats.shape[1] or index.index.d != feats.shape[2]:
                raise RetrievalError(f"{folder / 'index.faiss'} holds {index.index.ntotal} vectors of width "
                                     f"{index.index.d}, not the gallery's {feats.shape[0] * feats.shape[1]} of width "
                                     f"{feats.shape[2]}: it belongs to another gallery; {fix}")
        return cls(feats, embeds, index)


@dataclass
class TextGallery:
    """Encoded candidate texts for image -> text retrieval."""
    texts: list[str]
    feats: np.ndarray  # [N, D] unit vectors

    def __len__(self) -> int:
        return len(self.texts)


def rank(top: np.ndarray, itc: np.ndarray, itm_probs=None) -> list[Match]:
    """The ITC top k (`top`, best first, with their scores `itc`); when `itm_probs(indices) -> probs` is given,
    re-ranked by ITM (stable on ties)."""
    if itm_probs is None:
        return [Match(int(i), float(s), None) for i, s in zip(top, itc)]
    probs = np.asarray(itm_probs(top))
    order = np.argsort(-probs, kind="stable")
    return [Match(int(top[j]), float(itc[j]), float(probs[j])) for j in order]


def check_texts(texts: list, what: str) -> list[str]:
    """`texts` as a list of non-empty strings, or a PromptError naming the bad one."""
    if not texts:
        raise PromptError(f"no {what} given; pass one string or a list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"{what}[{i}] is {'empty' if isinstance(t, str) else type(t).__name__}; "
                              f"every text must be a non-empty string")
    return list(texts)


def rows_float32(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] in float32: the ITM re-rank's image embeddings, read from a gallery's float16 (memory-mapped)
    ones (converted by ONNX Runtime, 5-7x faster than numpy: `runtime.ort_runner.float16_to_float32`)."""
    picked = np.asarray(array[rows])
    if picked.dtype == np.float16:
        return float16_to_float32(picked)
    return picked.astype(np.float32, copy=False)


def _softmax_match(logits: np.ndarray) -> np.ndarray:
    """ITM logits [N, 2] -> probability of 'match' [N] (float64 softmax, float32 result)."""
    logits = logits.astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e[:, 1] / e.sum(-1)).astype(np.float32)


class QFormerText:
    """ITC text features (unimodal graph), ITM and question-aware queries (bi-directional graph), retrieval.
    ITM of one text against many images (text -> image re-ranking) and of one image against many texts (image ->
    text) go through qformer_itm_one_text / qformer_itm_one_image, the work every pair shares done once, where the
    folder has them; folders built before them use qformer_itm, to the same probabilities."""

    def __init__(self, manifest, runners: dict, encoder):
        self.encoder, self.max_batch = encoder, manifest.limits.max_batch
        self.tokenizer = QFormerTokenizer.from_manifest(manifest)
        self.text, self.itm = runners.get("qformer_text"), runners.get("qformer_itm")
        self.one_text, self.one_image = runners.get("qformer_itm_one_text"), runners.get("qformer_itm_one_image")

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[T, D] unit vectors: the normalised [CLS] projection of each text."""
        out = []
        for part in chunks(len(texts), self.max_batch):
            ids, mask = self.tokenizer.encode_texts(texts[part])
            out.append(self.text.run({"input_ids": ids, "attention_mask": mask})["text_feat"])
        return np.concatenate(out)

    def itm_outputs(self, image_embeds: np.ndarray, texts: list[str], one_image: bool = False) -> dict[str, np.ndarray]:
        """The bi-directional graph on (image, text) pairs: itm_logits, text-conditioned query_output and, for
        stage 2, llm_prompt. one_image: image_embeds [1, Np, Dv] against every text, through qformer_itm_one_image
        (itm_logits only)."""
        runner, parts = (self.one_image if one_image else self.itm), []
        for part in chunks(len(texts), self.max_batch):
            ids, mask = self.tokenizer.encode_texts(texts[part])
            images = image_embeds if one_image else image_embeds[part]
            parts.append(runner.run({"image_embeds": images, "input_ids": ids, "attention_mask": mask}))
        return {n: np.concatenate([p[n] for p in parts]) for n in runner.output_names}

    def itm_probs(self, image_embeds: np.ndarray, texts: list[str]) -> np.ndarray:
        return _softmax_match(self.itm_outputs(image_embeds, texts)["itm_logits"])

    def itm_probs_one_text(self, image_embeds: np.ndarray, text: str) -> np.ndarray:
        """ITM probability of `text` against each image: itm_probs(image_embeds, [text] * N), faster."""
        if self.one_text is None:
            return self.itm_probs(image_embeds, [text] * len(image_embeds))
        ids, mask = self.tokenizer.encode_texts([text])
        logits = [self.one_text.run({"image_embeds": image_embeds[part], "input_ids": ids, "attention_mask": mask}
                                    )["itm_logits"] for part in chunks(len(image_embeds), self.max_batch)]
        return _softmax_match(np.concatenate(logits))

    def itm_probs_one_image(self, image_embeds: np.ndarray, texts: list[str]) -> np.ndarray:
        """ITM probability of one image (image_embeds [1, Np, Dv]) against each text, faster than itm_probs."""
        if self.one_image is None:
            return self.itm_probs(np.repeat(image_embeds, len(texts), 0), texts)
        return _softmax_match(self.itm_outputs(image_embeds, texts, one_image=True)["itm_logits"])

    def encode_gallery(self, images: list) -> ImageGallery:
        embeds = self.encoder.embed_images(images)
        return ImageGallery(self.encoder.queries(embeds, ["image_feats"])["image_feats"], embeds)

    def encode_texts(self, texts: list[str]) -> TextGallery:
        return TextGallery(texts, self.embed_texts(texts))

    def search_images(self, text: str, gallery: ImageGallery, k: int, rerank: bool) -> list[Match]:
        k = check_k(k, len(gallery), "image gallery")
        text_feat = self.embed_texts([text])[0]
        with one_blas_thread():  # (the ITM step follows at once on ONNX Runtime's threads)
            top, itc = gallery.search(text_feat, k)
        probs = (lambda idx: self.itm_probs_one_text(rows_float32(gallery.embeds, idx), text)
                 ) if rerank else None
        return rank(top, itc, probs)

    def search_texts(self, image, texts: TextGallery, k: int, rerank: bool) -> list[Match]:
        k = check_k(k, len(texts), "text gallery")
        query = self.encode_gallery([image])
        with one_blas_thread():  # (as in search_images)
            itc = similarity(query.feats, texts.feats)[0]
        top = top_k(itc, k)
        probs = (lambda idx: self.itm_probs_one_image(query.embeds, [texts.texts[i] for i in idx])
                 ) if rerank else None
        return rank(top, itc[top], probs)
