"""The re-rank's read of k image embeddings from a gallery's float16 file: numpy's float16 -> float32 conversion
against ONNX Runtime's Cast (`runtime.ort_runner.float16_to_float32`, what `rows_float32` uses), on the same rows.

    python bench/experiments/bench_float16.py                  # k = 128 rows of the small preset's 197 x 256 embeddings
    python bench/experiments/bench_float16.py --rows 16 --tokens 257 --width 1408   # k = 16 at ViT-g's size

Prints ms per read for each, their ratio, and whether the two results are bit for bit the same. ONNX Runtime's
session uses all cores unless --threads 1 (the runtime's shared pool, where a command turns it on, does too).
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from runtime import ort_runner as runners  # noqa: E402


def timed(fn, rounds: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        out = fn()
    return (time.perf_counter() - t0) / rounds * 1000, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128, help="images read (the re-rank's k; default 128)")
    ap.add_argument("--tokens", type=int, default=197, help="ViT tokens per image (default 197: small preset)")
    ap.add_argument("--width", type=int, default=256, help="ViT width (default 256: small preset)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads (default: one per core)")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    if args.threads:
        runners.OrtRunner._create_shared_pool(args.threads)  # (the cast session then uses this many)
    rows = np.random.default_rng(0).standard_normal((args.rows, args.tokens, args.width)).astype(np.float16)
    numpy_ms, want = timed(lambda: rows.astype(np.float32), args.rounds)
    ort_ms, got = timed(lambda: runners.float16_to_float32(rows), args.rounds)
    print(f"{rows.size:,} float16 values ({args.rows} x {args.tokens} x {args.width}): numpy {numpy_ms:.2f} ms, "
          f"ONNX Runtime Cast {ort_ms:.2f} ms ({args.threads or 'all'} threads): {numpy_ms / ort_ms:.1f}x; "
          f"bit for bit the same: {np.array_equal(got.view(np.uint32), want.view(np.uint32))}")


if __name__ == "__main__":
    main()
