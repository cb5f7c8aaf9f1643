"""Offline captioning throughput: `python -m runtime batch` (Ray Data, 1 and 2 actors) against a plain loop over
`Blip2Pipeline.caption` in one process, on the same images and engine folder.

    pip install ".[scale]"
    python -m export.build --model models/demo --target onnx
    python bench/bench_batch.py                          # 400 ShapesCaps images, engines/demo/onnx, batches of 8
    python bench/bench_batch.py --engines engines/NAME/onnx --images 1000 --workers 1 2 4
    python bench/bench_batch.py --images 2000 --batch-size 32 --json bench/results/batch.json   # for bench/report.py

The plain loop captions batches of `--batch-size` images with all cores' threads; each Ray run starts from an
empty output folder on a local Ray instance started beforehand (its start-up is not counted; the actors'
loading of the engine folder is) and uses `--batch-size` too, with the cores shared among its actors. Every run
must write the same captions as the loop; the agreement is printed beside images/s and the ratio to the loop.
No target is set for the ratio (docs/scale.md: on 2 cores and a model this small Ray's fixed costs dominate);
`--json FILE` writes the figures. The default engine folder is built from models/demo if it is missing.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Headline, engine_folder, timed, write_results  # noqa: E402
from runtime import Blip2Pipeline  # noqa: E402
from runtime.batch import Job, read_output, run  # noqa: E402

DEFAULT_ENGINES = ROOT / "engines" / "demo" / "onnx"


def write_images(folder: Path, count: int) -> list[str]:
    from train.shapescaps.synthetic import ShapesCaps

    data = ShapesCaps("val", n=count, image_size=64, seed=5)
    paths = []
    for i in range(count):
        paths.append(str(folder / f"{i:05d}.png"))
        data[i].image.save(paths[-1])
    return paths


def caption_loop(pipe, paths: list[str], batch_size: int) -> dict[str, str]:
    """{path: caption}: the images through Blip2Pipeline.caption, `batch_size` at a time."""
    loop = {}
    for s in range(0, len(paths), batch_size):
        chunk = paths[s:s + batch_size]
        loop.update(zip(chunk, pipe.caption(chunk)))
    return loop


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=str(DEFAULT_ENGINES), help="engine folder (default: engines/demo/onnx, "
                    "built from models/demo if missing)")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    args = ap.parse_args(argv)
    import ray

    if Path(args.engines).resolve() == DEFAULT_ENGINES and not (DEFAULT_ENGINES / "manifest.json").is_file():
        engine_folder(ROOT / "models" / "demo", "onnx", ROOT / "engines")  # as the quick start builds it

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = write_images(tmp / "images", args.images)
        pipe = Blip2Pipeline.from_dir(args.engines)
        seconds, loop = timed(caption_loop, pipe, paths, args.batch_size)
        loop_rate = len(paths) / seconds
        del pipe
        figures = {"engines": args.engines, "images": args.images, "batch_size": args.batch_size,
                   "cores": os.cpu_count(), "loop_images_per_s": loop_rate, "workers": {}}
        print(f"{args.images} images ({args.engines}), batches of {args.batch_size}, {os.cpu_count()} cores")
        print(f"plain loop over Blip2Pipeline.caption: {loop_rate:7.1f} images/s")
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        for workers in args.workers:
            out = tmp / f"out-{workers}"
            result = run(Job(engines=args.engines, task="caption", input=str(tmp / "images"), output=str(out),
                             workers=workers, batch_size=args.batch_size))
            rate = result["written"] / result["seconds"]
            same = sum(r["caption"] == loop[r["path"]] for r in read_output(out))
            figures["workers"][workers] = {"images_per_s": rate, "x_loop": rate / loop_rate, "written":
                                           result["written"], "seconds": result["seconds"], "same_captions": same}
            print(f"runtime batch, {workers} worker(s):    {rate:7.1f} images/s = {rate / loop_rate:.2f}x the loop | "
                  f"captions equal to the loop's {same}/{len(paths)}", flush=True)
        ray.shutdown()
    if args.json:
        write_results(args.json, f"batch: {Path(args.engines).parent.name}/{Path(args.engines).name}", figures, [
            Headline(f"runtime batch, {w} worker(s) / a plain loop over Blip2Pipeline.caption: images/s",
                     r["x_loop"], "x", note=f"{r['images_per_s']:.1f} against {loop_rate:.1f} images/s, batches of "
                     f"{args.batch_size}; captions equal to the loop's {r['same_captions']}/{args.images}")
            for w, r in figures["workers"].items()])


if __name__ == "__main__":
    main()
