"""Training memory against data size: `python -m train stage1` streams images from disk, so the process's memory
should not grow with the number of training images.

    python bench/bench_train_memory.py                       # 2,000 and 20,000 ShapesCaps images (64 px) on disk
    python bench/bench_train_memory.py --sizes 2000 20000 --steps 40 --workers 2
    python bench/bench_train_memory.py --steps 30 --json bench/results/train-memory.json   # for bench/report.py

For each size, ShapesCaps images are written as a COCO captions data set (once, under --root), then a fresh
`python -m train stage1` (ViT of models/demo, a small random BERT for the Q-Former, --steps steps) runs while
the memory of its whole process tree (the trainer and its image-decoding workers: their proportional set
sizes summed, so pages the forked workers share are counted once) is sampled every 0.1 s. Printed per size:
peak tree memory, peak RSS of the trainer alone, and the ratio to the
smallest size; beside it, what keeping every image's frozen-ViT output in memory (the demo's
`CaptionSet.embeds`) would take at that size. `--json FILE` writes the figures; the docs set no number for the
ratio (docs/training.md: memory does not grow with the data), so it is shown for context.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Headline, proc_bytes, write_results  # noqa: E402


def _rss(pid: int) -> int:
    return proc_bytes(pid, "VmRSS")


def _pss(pid: int) -> int:
    """Proportional set size: pages shared with the other processes of the tree (the workers are forked) are
    split between them, so the sum over the tree is the memory the tree takes."""
    return proc_bytes(pid, "Pss", "smaps_rollup")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def run_and_sample(cmd: list[str]) -> tuple[int, int, float, int]:
    """(peak summed PSS of the process tree, peak RSS of the top process, seconds, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tree_peak = top_peak = 0
    while proc.poll() is None:
        tree_peak = max(tree_peak, sum(_pss(p) for p in _tree(proc.pid)))
        top_peak = max(top_peak, _rss(proc.pid))
        time.sleep(0.1)
    if proc.returncode:
        print(proc.stderr.read()[-2000:], file=sys.stderr)
    return tree_peak, top_peak, time.perf_counter() - start, proc.returncode


def main(argv=None) -> int:
    from train.shapescaps.synthetic import write_files
    from train.blip2.random_checkpoint import make_bert
    from train.blip2.presets import image_tokens

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "blip2-edge-bench-train"),
                    help="where the data sets are written (kept for the next run)")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    bert = root / "bert"
    if not (bert / "config.json").is_file():
        make_bert(bert)
    vision = json.loads((ROOT / "models" / "demo" / "config.json").read_text())["vision_config"]
    tokens = image_tokens(SimpleNamespace(**vision))
    rows = []
    for n in args.sizes:
        data = root / f"shapes-{n}"
        if not (data / "captions_train.json").is_file():
            print(f"writing {n} images to {data} ...", flush=True)
            write_files(data, n, "train", image_size=64)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "train", "stage1", "--data", str(data / "captions_train.json"),
                   "--images", str(data / "images"), "--vision", str(ROOT / "models" / "demo"), "--qformer-init",
                   str(bert), "--out", f"{tmp}/out", "--run-dir", f"{tmp}/run", "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            tree, top, seconds, code = run_and_sample(cmd)
        if code:
            return code
        in_memory = n * tokens * vision["hidden_size"] * 4
        rows.append((n, tree, top, seconds, in_memory))
        print(f"{n:>7} images: peak memory {tree / 2**20:7.0f} MiB (trainer + {args.workers} workers, PSS; trainer RSS "
              f"{top / 2**20:.0f} MiB), {seconds:.0f} s for {args.steps} steps; every ViT output in memory would add "
              f"{in_memory / 2**20:.0f} MiB", flush=True)
    base = rows[0][1]
    for n, tree, *_ in rows[1:]:
        print(f"{n} vs {rows[0][0]} images: peak memory ratio {tree / base:.3f}")
    if args.json:
        mib = 2**20
        write_results(args.json, "train memory: stage 1, demo-sized model", {
            "steps": args.steps, "batch_size": args.batch_size, "workers": args.workers,
            "sizes": {n: {"peak_tree_pss_bytes": tree, "peak_trainer_rss_bytes": top, "seconds": seconds,
                          "vit_outputs_in_memory_bytes": in_memory} for n, tree, top, seconds, in_memory in rows}},
            [Headline(f"{n:,} images on disk: peak memory, trainer + {args.workers} workers (summed PSS)", tree / mib,
                      "MiB", note=f"trainer alone (RSS) {top / mib:.0f} MiB; every ViT output kept in memory instead "
                      f"would add {in_memory / mib:.0f} MiB") for n, tree, top, _, in_memory in rows]
            + [Headline(f"{n:,} against {rows[0][0]:,} images: peak memory", tree / base, "x")
               for n, tree, *_ in rows[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
