"""ITC search over a synthetic gallery of a million query features: exact (numpy) against the FAISS index the
gallery builds (runtime.index), queries per second, index memory and recall.

    pip install ".[scale]"
    python bench/bench_index.py                               # 1,000,000 vectors = 31,250 images x 32 queries
    python bench/bench_index.py --vectors 200000 --queries 50

The features are random unit vectors of width 256 (the Q-Former's ITC width), 32 per image, and the text
queries random unit vectors too: a worst case for an inverted-file index (no clusters to find), so the nprobe
it tunes to is high. (A million images of 32 queries would be 33 GB of float32 features, more than this
machine's 24 GB; the index is over vectors, so its cost per query scales with vectors, not images.) Each query
asks for the top 16 images; recall is the share of the exact top 16 the index returns, on the queries timed.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from runtime.index import APPROXIMATE_FROM, ExactIndex, FaissIndex  # noqa: E402


def unit(rng, *shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def timed(index, queries, k, **options) -> tuple[float, list]:
    t0 = time.perf_counter()
    found = [index.search(q, k, **options)[0] for q in queries]
    return len(queries) / (time.perf_counter() - t0), found


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index.index).nbytes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000, help="gallery query features (default 1,000,000)")
    ap.add_argument("--per-image", type=int, default=32, help="query features per image (BLIP-2: 32)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--queries", type=int, default=100, help="text queries timed")
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    images = args.vectors // args.per_image
    feats = unit(rng, images, args.per_image, args.width)
    queries = unit(rng, args.queries, args.width)
    print(f"gallery: {images:,} images x {args.per_image} queries = {feats.shape[0] * feats.shape[1]:,} vectors "
          f"of width {args.width} ({feats.nbytes / 2**30:.2f} GiB float32); {args.queries} queries, top {args.k}")

    exact_qps, truth = timed(ExactIndex(feats), queries, args.k)
    print(f"exact (numpy, every vector)      {exact_qps:8.1f} queries/s   memory: the features themselves")

    def report(name, index, built, **options):
        qps, found = timed(index, queries, args.k, **options)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / args.k for a, b in zip(found, truth)])
        print(f"{name:32s} {qps:8.1f} queries/s = {qps / exact_qps:5.2f}x exact | recall@{args.k} {recall:.3f} | "
              f"index {index_bytes(index) / 2**30:.2f} GiB | built in {built:.1f}s", flush=True)

    vectors = feats.shape[0] * feats.shape[1]
    t0 = time.perf_counter()
    report("flat (FAISS IndexFlatIP)", FaissIndex.build(feats, approximate_from=vectors + 1), time.perf_counter() - t0)
    t0 = time.perf_counter()
    ivf = FaissIndex.build(feats, approximate_from=min(APPROXIMATE_FROM, vectors))
    built, tuned = time.perf_counter() - t0, ivf.nprobe_for(args.k)
    report(f"IVF as built (nprobe {tuned} of {ivf.index.nlist})", ivf, built, nprobe=tuned)
    for nprobe in (16, 64, 256):  # what a lower nprobe buys, and what it misses
        if nprobe < tuned:
            report(f"IVF at nprobe {nprobe}", ivf, built, nprobe=nprobe)


if __name__ == "__main__":
    main()
