"""int8 with and without SmoothQuant-style smoothing (export/smoothing.py) on one checkpoint: the LLM graph's error
against PyTorch and whether the int8 gate passes, each way.

    python -m train.blip2.random_checkpoint --preset blip2-opt-6.7b --dtype float16 --outliers 4 --vision-layers 2 \
        --qformer-layers 2 --llm-layers 2 --out checkpoints/blip2-opt-6.7b-2l
    python -m export.build --model checkpoints/blip2-opt-6.7b-2l --target onnx
    python bench/experiments/bench_smoothing.py --model checkpoints/blip2-opt-6.7b-2l \
        --fp32 engines/blip2-opt-6.7b-2l/onnx

Each way is a whole `onnx-int8` build (calibration, conversion, the gate) in a temporary folder that reuses the
fp32 folder; "without" sets the outlier ratio past any channel's, so no LayerNorm is smoothed. Printed per way: the
LayerNorms smoothed, the LLM graph's worst output error as a share of its range and its lowest cosine over the
gate's checks (int8's bounds: 0.1 and 0.99), and the gate's verdict. The figures are quoted in docs/export.md.
"""
import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build_int8(model: str, fp32: Path, root: Path, smoothing: bool) -> dict:
    import export.build as build_module
    import export.smoothing as smoothing_module
    from export.parity import ParityError

    name = fp32.parent.name
    (root / name).mkdir(parents=True)
    os.symlink(fp32.resolve(), root / name / "onnx")  # (the build reuses an fp32 folder of the same checkpoint)
    seen, compare = [], build_module.compare_graphs

    def recording(references, open_runner, tol):
        results = compare(references, open_runner, tol)
        seen.extend(results)
        return results

    ratio = smoothing_module.OUTLIER_RATIO
    build_module.compare_graphs, smoothing_module.OUTLIER_RATIO = recording, ratio if smoothing else math.inf
    verdict = "passes"
    try:
        build_module.build(model, "onnx-int8", root, name=name)
    except ParityError as e:
        verdict = f"refused ({len(e.failures)} checks over int8's bounds)"
    except Exception as e:  # the end-to-end check (a different error type): its message says what failed
        verdict = f"refused: {str(e).splitlines()[0][:160]}"
    finally:
        build_module.compare_graphs, smoothing_module.OUTLIER_RATIO = compare, ratio
    llm = [c for c in seen if c.graph.startswith("llm") and c.bounds.startswith("max_rel")]
    return {"verdict": verdict, "max_rel": max(c.max_rel for c in llm), "cosine": min(c.cosine for c in llm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--fp32", required=True, type=Path, help="its fp32 engine folder (python -m export.build "
                    "--target onnx)")
    args = ap.parse_args(argv)
    from train.blip2.logs import quiet_libraries

    quiet_libraries(logging.WARNING)
    rows = {}
    for smoothing in (False, True):
        with tempfile.TemporaryDirectory(prefix="bench_smoothing.") as tmp:
            rows["smoothed (alpha 0.5)" if smoothing else "one scale per tensor"] = build_int8(
                args.model, args.fp32, Path(tmp), smoothing)
    print(f"\n{args.model}, onnx-int8:")
    print(f"{'':<22} {'LLM error / range':>17} {'lowest cosine':>14}  gate")
    for way, r in rows.items():
        print(f"{way:<22} {r['max_rel']:>17.3f} {r['cosine']:>14.4f}  {r['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
