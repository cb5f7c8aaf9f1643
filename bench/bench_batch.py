"""Offline captioning throughput: `python -m runtime batch` (Ray Data, 1 and 2 actors) against a plain loop over
`Blip2Pipeline.caption` in one process, on the same images and engine folder.

    pip install ".[scale]"
    python -m export.build --model models/demo --target onnx
    python bench/bench_batch.py                          # 400 ShapesCaps images, engines/demo/onnx, batches of 8
    python bench/bench_batch.py --engines engines/NAME/onnx --images 1000 --workers 1 2 4

The plain loop captions batches of `--batch-size` images with all cores' threads; each Ray run starts from an
empty output folder on a local Ray instance started beforehand (its start-up is not counted; the actors'
loading of the engine folder is) and uses `--batch-size` too, with the cores shared among its actors. Every run
must write the same captions as the loop; the agreement is printed beside images/s and the ratio to the loop.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import Blip2Pipeline  # noqa: E402
from runtime.batch import Job, read_output, run  # noqa: E402


def write_images(folder: Path, count: int) -> list[str]:
    from train.shapescaps.synthetic import ShapesCaps

    data = ShapesCaps("val", n=count, image_size=64, seed=5)
    paths = []
    for i in range(count):
        paths.append(str(folder / f"{i:05d}.png"))
        data[i].image.save(paths[-1])
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=str(ROOT / "engines" / "demo" / "onnx"))
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = write_images(tmp / "images", args.images)
        pipe = Blip2Pipeline.from_dir(args.engines)
        t0 = time.perf_counter()
        loop = {}
        for s in range(0, len(paths), args.batch_size):
            chunk = paths[s:s + args.batch_size]
            loop.update(zip(chunk, pipe.caption(chunk)))
        loop_rate = len(paths) / (time.perf_counter() - t0)
        del pipe
        print(f"{args.images} images ({args.engines}), batches of {args.batch_size}, {os.cpu_count()} cores")
        print(f"plain loop over Blip2Pipeline.caption: {loop_rate:7.1f} images/s")
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        for workers in args.workers:
            out = tmp / f"out-{workers}"
            result = run(Job(engines=args.engines, task="caption", input=str(tmp / "images"), output=str(out),
                             workers=workers, batch_size=args.batch_size))
            rate = result["written"] / result["seconds"]
            same = sum(r["caption"] == loop[r["path"]] for r in read_output(out))
            print(f"runtime batch, {workers} worker(s):    {rate:7.1f} images/s = {rate / loop_rate:.2f}x the loop | "
                  f"captions equal to the loop's {same}/{len(paths)}", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
