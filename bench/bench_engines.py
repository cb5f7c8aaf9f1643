"""Runtime figures of engine folders at the size users deploy: memory, decode speed against what memory
bandwidth allows, and how close each precision stays to PyTorch fp32.

    python -m train.blip2.random_checkpoint --preset blip2-opt-2.7b --dtype float16 --vision-layers 2 \
        --qformer-layers 2 --llm-layers 6 --out checkpoints/blip2-opt-2.7b-6l
    for t in onnx onnx-fp16 onnx-int4; do python -m export.build --model checkpoints/blip2-opt-2.7b-6l --target $t; done
    python bench/bench_engines.py --model checkpoints/blip2-opt-2.7b-6l \
        --engines engines/blip2-opt-2.7b-6l/onnx engines/blip2-opt-2.7b-6l/onnx-fp16 engines/blip2-opt-2.7b-6l/onnx-int4

First PyTorch fp32 (the checkpoint through Hugging Face's Blip2ForConditionalGeneration) captions `--images`
probe images greedily for `--new-tokens` tokens and keeps its logits; its weights are then released. Each
engine folder then runs in a fresh process that imports only the runtime (no torch), one at a time:
  * peak RSS (the process's VmHWM) after captioning one image, against the size of its graphs on disk (and, in
    the JSON, after teacher-forcing the 4 probe images at once);
  * time to first token (one image: preprocessing, ViT, Q-Former, LLM prefill, the first token) and the
    decode latency per token (one image; (time for N tokens - time for 1) / (N - 1), median of `--rounds`);
  * the bandwidth bound: each decoded token reads every LLM weight (but the rows the embedding lookup skips)
    once, so tokens/s cannot beat memory bandwidth / LLM weight bytes; bandwidth is measured in the same process
    as numpy's (multi-threaded BLAS) matrix-vector product streams a 512 MB float32 matrix, the access pattern
    of a decode step, and the measured tokens/s is printed as a fraction of that bound ("of bound": 1.0 would
    be bandwidth-bound);
  * teacher-forced agreement with PyTorch fp32: fed PyTorch's tokens, the share of positions where the engine's
    top token is PyTorch's, and the cosine between its logits and PyTorch's (per position, the mean and the
    minimum). With random weights the logits are nearly flat, so top-1 flips at near-ties: the cosine is the
    measure there, top-1 on trained models.
The ratio of each folder's decode speed to the first folder's (normally fp32) closes the table.

The targets (docs/export.md, held on the 677M OPT-2.7B-width variant): an fp32 folder's peak RSS at most 1.3x its
graphs; an int4 folder decoding at least 3x the tokens/s of the first folder, when that one is fp32, with a
teacher-forced logit cosine of at least 0.99 at every position. `--json FILE` writes them beside the figures
(bench/report.py; `--no-targets`: the figures alone, for other models).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import Headline, held_target, write_results  # noqa: E402

PROBE = r'''
import json, sys, time
import numpy as np
from PIL import Image
import runtime
from bench.common import median_seconds, proc_bytes, timed

engine, work, new_tokens, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ref = np.load(f"{work}/reference.npz")
images = [Image.open(f"{work}/{i}.png") for i in range(int(ref["count"]))]
t0 = time.perf_counter()
pipe = runtime.Blip2Pipeline.from_dir(engine)
open_s = time.perf_counter() - t0

def caption(n):
    pipe.generate_ids(images[:1], max_new_tokens=n, min_new_tokens=n)

caption(2)  # warm-up
ttft = median_seconds(lambda: caption(1), rounds)
total = median_seconds(lambda: caption(new_tokens), rounds)
caption_hwm = proc_bytes()  # VmHWM: this process's own peak RSS
per_token = (total - ttft) / (new_tokens - 1)
scores = pipe.score(images, [ref[f"tokens{i}"].tolist() for i in range(len(images))])
top1, cosines = [], []
for b, s in enumerate(scores):
    w = ref[f"logits{b}"]
    top1 += (s.argmax(-1) == w.argmax(-1)).tolist()
    cosines += ((s * w).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(w, axis=-1)).tolist()
assert "torch" not in sys.modules
hwm = proc_bytes()
matrix, vector = np.ones((16384, 8192), np.float32), np.ones(8192, np.float32)  # 512 MB
bandwidth = matrix.nbytes / min(timed(matrix.dot, vector)[0] for _ in range(5))  # bytes a matrix-vector product
print(json.dumps({"open_s": open_s, "ttft_s": ttft, "per_token_s": per_token, "top1": float(np.mean(top1)),
                  "cosine_mean": float(np.mean(cosines)), "cosine_min": float(np.min(cosines)),
                  "bandwidth": bandwidth, "peak_rss": caption_hwm, "peak_rss_scoring": hwm,
                  "precision": pipe.manifest.precision.name}))
'''


def graph_bytes(folder: Path, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.name.startswith(prefix) and p.name.endswith((".onnx", ".onnx.data", ".engine")))


def weights_read_per_token(graph: Path) -> int:
    """Bytes of the weights one decode step of `graph` reads: every initializer but those only looked up by a
    Gather (the embedding table: one row per token)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sum(int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in model.graph.initializer if readers.get(t.name, {"Gather"}) != {"Gather"})


def reference(model: str, work: Path, count: int, new_tokens: int) -> None:
    """PyTorch fp32's greedy tokens and their logits for `count` probe images, into work/reference.npz."""
    import torch

    from export.parity import probe_images
    from train.blip2.checkpoint import load_checkpoint
    from train.blip2.reference import HfReference

    ck = load_checkpoint(model)
    images = probe_images(ck.config.vision_config.image_size, count=count, seed=7)
    for i, im in enumerate(images):
        im.save(work / f"{i}.png")
    with torch.inference_mode():
        out = HfReference(ck, ck.hf).generate(images, None, output_logits=True, max_new_tokens=new_tokens,
                                              min_new_tokens=new_tokens)
    np.savez(work / "reference.npz", count=count, **{f"tokens{i}": np.array(t) for i, t in enumerate(out.tokens)},
             **{f"logits{i}": lg.float().numpy() for i, lg in enumerate(out.logits)})  # [steps, V] per image
    ck.release_weights()


def measure(engine: Path, work: Path, new_tokens: int, rounds: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(engine), str(work), str(new_tokens), str(rounds)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: the runtime probe failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["graphs"] = graph_bytes(engine)
    llm = engine / "llm_decoder.onnx"
    r["llm_bytes"] = weights_read_per_token(llm) if llm.is_file() else graph_bytes(engine, "llm_decoder")
    r["floor_tokens_s"] = r["bandwidth"] / r["llm_bytes"]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the checkpoint the folders were built from (PyTorch fp32 "
                    "reference)")
    ap.add_argument("--engines", nargs="+", required=True, type=Path, help="engine folders; the first is the "
                    "baseline of the speed ratio (normally the fp32 one)")
    ap.add_argument("--images", type=int, default=4, help="probe images for the teacher-forced comparison")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    ap.add_argument("--no-targets", action="store_true", help="write the figures without the targets (which are held "
                    "on the 677M OPT-2.7B-width variant) beside them: for other models, shown for context")
    args = ap.parse_args(argv)
    from train.blip2.logs import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="blip2-edge-bench-") as tmp:
        work = Path(tmp)
        reference(args.model, work, args.images, args.new_tokens)
        results = {str(e): measure(e, work, args.new_tokens, args.rounds) for e in args.engines}
    base = results[str(args.engines[0])]["per_token_s"]
    print(f"\n{args.model}: {args.images} probe images, {args.new_tokens} new tokens, batch 1, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'folder':<28} {'graphs GB':>9} {'peak RSS':>9} {'ratio':>6} {'TTFT s':>7} {'ms/token':>9} {'tok/s':>6} "
          f"{'bound':>6} {'of bound':>8} {'vs first':>8} {'top-1':>6} {'cos mean':>8} {'cos min':>8}")
    for engine, r in results.items():
        tps = 1 / r["per_token_s"]
        print(f"{Path(engine).name:<28} {r['graphs'] / 1e9:9.2f} {r['peak_rss'] / 1e9:9.2f} "
              f"{r['peak_rss'] / r['graphs']:6.2f} {r['ttft_s']:7.2f} {1000 * r['per_token_s']:9.1f} {tps:6.1f} "
              f"{r['floor_tokens_s']:6.1f} {tps / r['floor_tokens_s']:8.2f} {base / r['per_token_s']:7.2f}x "
              f"{r['top1']:6.3f} {r['cosine_mean']:8.4f} {r['cosine_min']:8.4f}")
    print(f"memory bandwidth measured: {results[str(args.engines[0])]['bandwidth'] / 1e9:.1f} GB/s (numpy float32 "
          "matrix-vector product, 512 MB)")
    if args.json:
        write_results(args.json, f"engines: {Path(args.model).name}", results,
                      headline(results, not args.no_targets))
    return 0


def headline(results: dict, held: bool) -> list[Headline]:
    """Per folder: peak RSS against its graphs, decode speed against the first folder's, the logit cosine."""
    (first, base), out = next(iter(results.items())), []
    for engine, r in results.items():
        name, precision, tps = Path(engine).name, r["precision"], 1 / r["per_token_s"]
        out.append(Headline(f"{name}: runtime peak RSS / graphs on disk", r["peak_rss"] / r["graphs"], "x",
                            *held_target("<=", 1.3, held and precision == "fp32"),
                            f"{r['peak_rss'] / 1e9:.2f} against {r['graphs'] / 1e9:.2f} GB, one image captioned"))
        bound = f"{r['floor_tokens_s']:.1f} tokens/s the bandwidth bound ({tps / r['floor_tokens_s']:.2f} of it)"
        if engine == first:
            out.append(Headline(f"{name}: decode speed, batch 1", tps, "tokens/s", note=bound))
        else:
            int4_on_fp32 = precision == "int4" and base["precision"] == "fp32"
            out.append(Headline(f"{name}: decode tokens/s / {Path(first).name}'s", base["per_token_s"] * tps, "x",
                                *held_target(">=", 3.0, held and int4_on_fp32),
                                f"{tps:.1f} against {1 / base['per_token_s']:.1f} tokens/s; {bound}"))
        out.append(Headline(f"{name}: teacher-forced logit cosine with PyTorch fp32, lowest position", r["cosine_min"],
                            "", *held_target(">=", 0.99, held and precision == "int4"),
                            f"mean {r['cosine_mean']:.4f}; top-1 agreement {r['top1']:.3f}"))
    return out


if __name__ == "__main__":
    sys.exit(main())
