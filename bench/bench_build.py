"""Peak memory and time of `python -m export.build` against the size of the checkpoint's float32 weights.

    python -m train.blip2.random_checkpoint --preset blip2-opt-2.7b --dtype float16 --vision-layers 2 \
        --qformer-layers 2 --llm-layers 6 --out checkpoints/blip2-opt-2.7b-6l       # 677M parameters, 2.7 GB in float32
    python bench/bench_build.py --model checkpoints/blip2-opt-2.7b-6l --targets onnx onnx-int4

Each target is built by a fresh `python -m export.build` process (the whole build: export, the parity gate
and, for reduced targets, the conversion and its gate); its peak resident set (the kernel's ru_maxrss of
that process and its children) and wall time are printed beside the checkpoint's weights counted in float32
(parameters x 4 bytes, read from the safetensors headers without loading a tensor). The target of the
memory-bounded build is a ratio of at most 1.5.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Headline, write_results  # noqa: E402
from train.blip2.checkpoint import parameter_count  # noqa: E402


def build_once(model: str, target: str, out: Path, extra: list[str]) -> tuple[float, float, int]:
    """(peak RSS in bytes, seconds, exit code) of one build in a fresh process (its own rusage, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "export.build", "--model", model, "--target", target,
                             "--out", str(out), *extra], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024.0, time.perf_counter() - start, proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (or hub id) to build")
    ap.add_argument("--targets", nargs="+", default=["onnx"], help="export.build targets, built in this order")
    ap.add_argument("--out", help="engines root (default: a temporary folder, removed at the end)")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    ap.add_argument("build_args", nargs=argparse.REMAINDER, help="after --: more export.build options")
    args = ap.parse_args(argv)
    extra = [a for a in args.build_args if a != "--"]
    folder = Path(args.model)
    if not folder.is_dir():
        raise SystemExit(f"--model {folder}: not a folder; write one with `python -m train.blip2.random_checkpoint "
                         f"--preset ... --out {folder}`")
    fp32 = parameter_count(folder) * 4
    print(f"{folder}: {fp32 / 4 / 1e6:.0f}M parameters, {fp32 / 2**30:.2f} GiB in float32")
    with tempfile.TemporaryDirectory(prefix="bench_build.") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        rows = []
        for target in args.targets:
            print(f"--- {target}", flush=True)
            peak, seconds, rc = build_once(str(folder), target, out, extra)
            rows.append((target, peak, seconds, rc))
    print(f"\n{'target':<12} {'peak RSS GiB':>12} {'x fp32 weights':>15} {'time s':>8}  result")
    for target, peak, seconds, rc in rows:
        print(f"{target:<12} {peak / 2**30:>12.2f} {peak / fp32:>15.2f} {seconds:>8.0f}  "
              f"{'ok' if rc == 0 else f'failed (exit {rc})'}")
    if args.json:
        write_results(args.json, f"build: {folder.name}", {
            "parameters": fp32 // 4, "fp32_weight_bytes": fp32,
            "targets": {t: {"peak_rss_bytes": peak, "seconds": seconds, "exit": rc} for t, peak, seconds, rc in rows}},
            [Headline(f"{target}: peak RSS / fp32 weights" + ("" if rc == 0 else " (build refused or failed)"),
                      peak / fp32, "x", "<=", 1.5,
                      f"{peak / 2**30:.2f} GiB, {seconds:.0f} s, " + ("built" if rc == 0 else f"failed (exit {rc})"))
             for target, peak, seconds, rc in rows])
    return 0 if all(r[3] == 0 for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
