"""ITC search over a synthetic gallery of a million query features: exact (numpy) against the FAISS index the
gallery builds (runtime.index), queries per second, index memory and recall.

    pip install ".[scale]"
    python bench/bench_index.py                               # 1,000,000 vectors = 31,250 images x 32 queries
    python bench/bench_index.py --vectors 200000 --queries 50
    python bench/bench_index.py --queries 30 --json bench/results/index.json   # the figures, for bench/report.py

The features are random unit vectors of width 256 (the Q-Former's ITC width), 32 per image, and the text
queries random unit vectors too: a worst case for an inverted-file index (no clusters to find), so the nprobe
it tunes to is high. (A million images of 32 queries would be 33 GB of float32 features, more than this
machine's 24 GB; the index is over vectors, so its cost per query scales with vectors, not images.) Each query
asks for the top 16 images; recall is the share of the exact top 16 the index returns, on the queries timed.
The target: the IVF index as built (its nprobe tuned when it is built) finds runtime.index.RECALL_TARGET (0.99) of
the exact top k (docs/runtime.md); no speed is targeted here (on features without clusters no setting is both fast
and right, and galleries like these are searched exactly: docs/testing.md).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import Headline, timed, write_results  # noqa: E402
from runtime.index import APPROXIMATE_FROM, RECALL_TARGET, ExactIndex, FaissIndex  # noqa: E402


def unit(rng, *shape) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def queries_per_s(index, queries, k, **options) -> tuple[float, list]:
    """(queries per second, the images found for each query)"""
    seconds, found = timed(lambda: [index.search(q, k, **options)[0] for q in queries])
    return len(queries) / seconds, found


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
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    images = args.vectors // args.per_image
    feats = unit(rng, images, args.per_image, args.width)
    queries = unit(rng, args.queries, args.width)
    print(f"gallery: {images:,} images x {args.per_image} queries = {feats.shape[0] * feats.shape[1]:,} vectors "
          f"of width {args.width} ({feats.nbytes / 2**30:.2f} GiB float32); {args.queries} queries, top {args.k}")

    exact_qps, truth = queries_per_s(ExactIndex(feats), queries, args.k)
    print(f"exact (numpy, every vector)      {exact_qps:8.1f} queries/s   memory: the features themselves")
    figures = {"images": images, "per_image": args.per_image, "width": args.width, "queries": args.queries,
               "k": args.k, "feature_bytes": feats.nbytes, "exact_queries_per_s": exact_qps, "indexes": {}}

    def report(name, index, built, **options):
        qps, found = queries_per_s(index, queries, args.k, **options)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / args.k for a, b in zip(found, truth)])
        figures["indexes"][name] = {"queries_per_s": qps, "x_exact": qps / exact_qps, "recall": float(recall),
                                    "index_bytes": index_bytes(index), "built_s": built, **options}
        print(f"{name:32s} {qps:8.1f} queries/s = {qps / exact_qps:5.2f}x exact | recall@{args.k} {recall:.3f} | "
              f"index {figures['indexes'][name]['index_bytes'] / 2**30:.2f} GiB | built in {built:.1f}s", flush=True)

    vectors = feats.shape[0] * feats.shape[1]
    built, flat = timed(FaissIndex.build, feats, approximate_from=vectors + 1)
    report("flat (FAISS IndexFlatIP)", flat, built)
    built, ivf = timed(FaissIndex.build, feats, approximate_from=min(APPROXIMATE_FROM, vectors))
    tuned = ivf.nprobe_for(args.k)
    as_built = f"IVF as built (nprobe {tuned} of {ivf.index.nlist})"
    report(as_built, ivf, built, nprobe=tuned)
    for nprobe in (16, 64, 256):  # what a lower nprobe buys, and what it misses
        if nprobe < tuned:
            report(f"IVF at nprobe {nprobe}", ivf, built, nprobe=nprobe)
    if args.json:
        rows = figures["indexes"]
        write_results(args.json, f"index: {vectors:,} vectors of width {args.width}", figures, [
            Headline(f"{as_built}: recall@{args.k} against exact search", rows[as_built]["recall"], "",
                     ">=", RECALL_TARGET, f"on the {args.queries} queries timed (random unit vectors: no clusters)"),
            Headline(f"{as_built}: queries/s / exact (numpy)", rows[as_built]["x_exact"], "x",
                     note=f"{rows[as_built]['queries_per_s']:.1f} against {exact_qps:.1f} queries/s; index "
                          f"{rows[as_built]['index_bytes'] / 2**30:.2f} GiB, built in {built:.1f} s"),
            Headline("flat (FAISS IndexFlatIP): queries/s / exact (numpy)",
                     rows["flat (FAISS IndexFlatIP)"]["x_exact"], "x")])


if __name__ == "__main__":
    main()
