"""The first step of text -> image retrieval over a large gallery: which images hold the query feature most
similar to a text.

BLIP-2's ITC similarity of an image and a text is the largest dot product between the text feature and any of
the image's Nq query features. An index therefore holds every query vector of every image (N * Nq rows of
width D) and answers with images: the vectors nearest to the text, mapped to their images, then each candidate
image re-scored exactly (max over its Nq features) so that scores and order are those of exact search.

    index = build_index(feats)          # feats [N, Nq, D]: exact, or FAISS IVF when large
    images, scores = index.search(text_feat, k)

* `ExactIndex` (numpy only, always available): the similarity against every row (`similarity`, as
  `Blip2Pipeline.similarity`); what a gallery of fewer than `APPROXIMATE_FROM` query vectors uses.
* `FaissIndex` (`pip install faiss-cpu`, the `scale` extra): `IndexIVFFlat` (inner product) from
  `APPROXIMATE_FROM` rows, with `nprobe` raised at build time until the index finds the exact top k of probe
  queries, for each k of `PROBE_KS` (a larger k needs more lists: an nprobe tuned for the top 16 found 88% of
  the top 128 on clustered features); the recall per k is measured against exact search and kept with the
  index, a search uses the nprobe of the smallest tuned k at least its own, and a k beyond them is tuned on
  first use. `IndexFlatIP` on request. Where the nprobe a k needs exceeds a quarter of the lists (features
  without clusters), scanning that much is slower than numpy: `build_index` returns exact search when even
  the smallest k needs it, and a search for a larger k that needs it is answered exactly.
  Exact re-scoring of the candidates makes the returned scores exact; an approximate index can only miss an
  image, never misorder the ones it finds. Searching the top k * Nq vectors is exact for a flat index: every
  vector scoring at least the k-th best image's score belongs to one of the k best images (at most Nq each).
  Only the 2k images whose best vector found ranks highest are re-scored, not every image with a vector found
  (3,900 of them for k = 128 over 10,000 images: 30 ms against 2): an image whose best vector was found ranks
  by its exact score, so each of the exact top k whose best vector was found is among the first k (the 2k
  absorb float differences between FAISS and numpy at the boundary); an image whose best vector lies in an
  unprobed list may now be missed where a lesser vector of it was found, which the recall tuning measures.
"""
import importlib.util
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

APPROXIMATE_FROM = 200_000  # query vectors (6,250 images of 32 queries): IVF from here, flat below
RECALL_TARGET = 0.99  # probe queries' top-k images found by IVF against exact search, when it is built
PROBE_QUERIES = 64
PROBE_KS = (16, 32, 64, 128, 256)  # top-k sizes an IVF index is tuned for at build time (larger: on first use)
MOST_LISTS = 4  # an IVF index that must probe more than 1/4 of its lists is slower than exact numpy search
RESCORED = 2  # a FAISS search re-scores exactly the RESCORED * k images whose vectors it found best


_controller = None  # (threadpoolctl's view of the loaded thread pools, FAISS loaded then); False: no threadpoolctl


def one_blas_thread():
    """A context in which numpy's BLAS and FAISS's OpenMP run on the calling thread only (threadpoolctl, when
    installed; the `scale` extra has it). Their worker threads keep spinning for a while after each call: where
    ONNX Runtime runs next, as the ITM step after a retrieval query's search (`runtime.retrieval`), they take its
    cores (`bench/bench_retrieval.py`, 2 cores: a k = 16 query over 10,000 images took 133 ms before, 60 after).
    The thread pools are scanned (~6 ms) at the first call and again once FAISS, imported only when a gallery
    first needs it, has been loaded."""
    global _controller
    if _controller is None and importlib.util.find_spec("threadpoolctl") is None:
        _controller = False
    if _controller is False:
        return nullcontext()
    faiss_loaded = "faiss" in sys.modules
    if _controller is None or _controller[1] != faiss_loaded:
        from threadpoolctl import ThreadpoolController

        _controller = (ThreadpoolController(), faiss_loaded)
    return _controller[0].limit(limits=1)


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


def exact_top_images(feats: np.ndarray, text_feat: np.ndarray, k: int, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact search over `feats` [N, Nq, D] (or only its images `rows`): (image indices, ITC scores), best
    first, ties broken by lower index."""
    ids = None if rows is None else np.sort(rows)
    chosen = feats if ids is None else feats[ids]
    scores = similarity(np.asarray(chosen, dtype=np.float32), text_feat[None])[:, 0]
    best = top_k(scores, k)
    return (best if ids is None else ids[best]), scores[best]


@dataclass
class ExactIndex:
    """Exact ITC search with numpy over the gallery's features (in memory or memory-mapped)."""
    feats: np.ndarray  # [N, Nq, D]
    why: str | None = None  # why a large gallery is searched exactly
    kind = "exact"

    def search(self, text_feat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_top_images(self.feats, text_feat, k)

    def describe(self) -> dict:
        return {"kind": self.kind, **({"why": self.why} if self.why else {})}


class FaissIndex:
    """ITC search through a FAISS inner-product index over every query vector, candidates re-scored exactly."""

    def __init__(self, index, feats: np.ndarray, nprobes: dict | None = None, recalls: dict | None = None):
        self.index, self.feats = index, feats
        self.kind = "ivf" if hasattr(index, "nprobe") else "flat"
        self.nprobes = {int(k): int(n) for k, n in (nprobes or {}).items()}  # top k -> nprobe reaching the target
        self.recalls = {int(k): float(r) for k, r in (recalls or {}).items()}  # top k -> recall measured there

    @classmethod
    def build(cls, feats: np.ndarray, approximate_from: int = APPROXIMATE_FROM, seed: int = 0) -> "FaissIndex":
        import faiss

        vectors = _rows(feats)
        width = vectors.shape[1]
        if len(vectors) < approximate_from:
            index = faiss.IndexFlatIP(width)
            index.add(vectors)
            return cls(index, feats)
        lists = int(4 * np.sqrt(len(vectors)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), 64 * lists), replace=False))]
        index.train(sample)
        _add_rows(index, vectors)
        built = cls(index, feats)
        built.tune(PROBE_KS, seed)
        return built

    def add(self, new_feats: np.ndarray, feats: np.ndarray) -> None:
        """Add the query features of new images `new_feats` [M, Nq, D] (IVF: to the trained lists); `feats` is
        the whole gallery's features after them."""
        _add_rows(self.index, _rows(new_feats))
        self.feats = feats

    def exact_is_faster(self, nprobe: int) -> bool:
        """Whether searching `nprobe` lists costs more than exact numpy search (more than 1/MOST_LISTS of them)."""
        return self.kind == "ivf" and nprobe > self.index.nlist // MOST_LISTS

    def tune(self, ks, seed: int = 0) -> None:
        """For each top k in `ks` (ascending), raise nprobe (doubling, from the previous k's) until probe queries
        (mixtures of two gallery images' query features) find the exact top k images in at least RECALL_TARGET
        of places; keep nprobe and the recall measured per k. Stops raising past a quarter of the lists (exact
        search is faster there): the remaining ks get every list."""
        images, queries, width = self.feats.shape
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, images, size=(PROBE_QUERIES, 2))
        probes = self.feats[pick[:, 0], rng.integers(0, queries, PROBE_QUERIES)] + \
            self.feats[pick[:, 1], rng.integers(0, queries, PROBE_QUERIES)]
        probes = (probes / np.linalg.norm(probes, axis=1, keepdims=True)).astype(np.float32)
        truth = [exact_top_images(self.feats, p, min(max(ks), images))[0] for p in probes]  # best first
        nlist = self.index.nlist
        nprobe = max(self.nprobes.values(), default=4)
        for k in sorted(ks):
            if self.exact_is_faster(nprobe):
                self.nprobes[k], self.recalls[k] = nlist, 1.0  # answered by exact search (see search)
                continue
            top = min(k, images)
            while True:
                found = sum(len(set(t[:top].tolist()) & set(self._search(p, top, nprobe)[0].tolist()))
                            for t, p in zip(truth, probes))
                recall = found / (top * len(probes))
                if recall >= RECALL_TARGET or nprobe >= nlist:
                    break
                nprobe = min(nprobe * 2, nlist)
            self.nprobes[k], self.recalls[k] = nprobe, recall
        self.index.nprobe = self.nprobes[min(self.nprobes)]  # what FAISS itself uses, saved with the index

    def nprobe_for(self, k: int) -> int:
        """The nprobe tuned for the smallest top k at least `k`; a larger k than any tuned is tuned now (for the
        next power of two) and kept."""
        if self.kind != "ivf":
            return 0
        tuned = [t for t in self.nprobes if t >= k]
        if not tuned:
            self.tune([1 << max(k - 1, 1).bit_length()])
            tuned = [t for t in self.nprobes if t >= k]
        return self.nprobes[min(tuned)]

    def search(self, text_feat: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, exact ITC scores), best first. `nprobe` (IVF) searches that many lists instead of the
        tuned number, as asked (benchmarks: what fewer lists buy and miss); the tuned number falls back to exact
        search where that is faster."""
        if nprobe is not None:
            return self._search(text_feat, k, nprobe)
        nprobe = self.nprobe_for(k)
        if self.exact_is_faster(nprobe):
            return exact_top_images(self.feats, text_feat, k)  # a k needing most lists: exact is faster
        return self._search(text_feat, k, nprobe)

    def _search(self, text_feat: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        images, queries, _ = self.feats.shape
        params = faiss.SearchParametersIVF(nprobe=nprobe) if self.kind == "ivf" else None
        _, ids = self.index.search(np.ascontiguousarray(text_feat[None], dtype=np.float32),
                                   min(k * queries, self.index.ntotal), params=params)
        found = ids[0][ids[0] >= 0] // queries  # the image of each vector found, best vector first
        _, first = np.unique(found, return_index=True)
        candidates = found[np.sort(first)]  # each image once, ranked by the best of its vectors found
        if len(candidates) < min(k, images):  # too few vectors in the probed lists: exact search
            return exact_top_images(self.feats, text_feat, k)
        return exact_top_images(self.feats, text_feat, k, rows=candidates[:RESCORED * k])

    def describe(self) -> dict:
        out = {"kind": self.kind, "vectors": int(self.index.ntotal)}
        if self.kind == "ivf":
            out.update(lists=int(self.index.nlist), nprobe=self.nprobes, recall=self.recalls,
                       recall_measured_on=f"{PROBE_QUERIES} probe queries per top k (images)")
        return out

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, feats: np.ndarray, described: dict) -> "FaissIndex":
        """The index saved at `path`, with its tuning as `describe()` gave it (`nprobe` and `recall` per top k;
        a gallery saved before per-k tuning has one nprobe, that of the top 16: larger ks are tuned on use)."""
        import faiss

        index = faiss.read_index(str(path))
        nprobe, recall = described.get("nprobe"), described.get("recall")
        if isinstance(nprobe, int):
            nprobe, recall = {PROBE_KS[0]: nprobe}, {PROBE_KS[0]: recall}
        return cls(index, feats, nprobe, recall)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def build_index(feats: np.ndarray, approximate_from: int | None = None):
    """Exact numpy search below `approximate_from` query vectors (default APPROXIMATE_FROM), a FAISS IVF index
    from there when FAISS is installed. (FAISS's exact IndexFlatIP answers one query at a time about 3x slower
    than numpy's BLAS matrix-vector product on this 2-core machine, bench/bench_index.py, so the exact path is
    numpy's; batches of queries are where IndexFlatIP pays off.)"""
    approximate_from = APPROXIMATE_FROM if approximate_from is None else approximate_from
    if not faiss_available() or feats.shape[0] * feats.shape[1] < approximate_from:
        return ExactIndex(feats)
    index = FaissIndex.build(feats, approximate_from)
    if index.exact_is_faster(index.nprobe_for(PROBE_KS[0])):
        # features without clusters (random unit vectors: every list needed for 99% recall, bench/bench_index.py):
        # scanning that many lists costs more than numpy's exact product
        return ExactIndex(feats, why=f"IVF needed nprobe {index.nprobe_for(PROBE_KS[0])} of {index.index.nlist} "
                                     f"lists for {RECALL_TARGET:.0%} recall of the top {PROBE_KS[0]}; exact search "
                                     f"is faster")
    return index


def _add_rows(index, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), 1 << 18):  # added in parts: FAISS makes no second copy of every vector
        index.add(vectors[start:start + (1 << 18)])


def _rows(feats: np.ndarray) -> np.ndarray:
    images, queries, width = feats.shape
    return np.ascontiguousarray(feats.reshape(images * queries, width), dtype=np.float32)
