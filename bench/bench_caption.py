"""Per-caption latency of the ONNX Runtime pipeline against Hugging Face `generate`, and runtime memory.

    python bench/bench_caption.py                         # small preset (~30M params), batch 1 and 8
    python bench/bench_caption.py --preset tiny --rounds 5 --batches 1 4

Same model, same images, same tokens: both sides generate exactly `--new-tokens` tokens
(min_new_tokens = max_new_tokens) greedily from the same pixels, and the token ids are checked
equal before any timing counts. Each round times the pipeline, HF eager and HF sdpa back to back
(interleaved, so drift hits all three alike); the medians are reported, and the ratio is taken
against the faster PyTorch variant. Timings include image preprocessing on both sides.

Memory: a fresh process that imports only `runtime` loads the engine folder and captions; its
peak RSS is printed beside the size of the weights on disk.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import Blip2ForConditionalGeneration  # noqa: E402

from export.build import build  # noqa: E402
from export.checkpoint import load_checkpoint  # noqa: E402
from export.e2e import hf_pixel_values, probe_images  # noqa: E402
from runtime import Blip2Pipeline  # noqa: E402
from train.demo import make_random_checkpoint  # noqa: E402

MEMORY_PROBE = """
import sys
import runtime
from export_free_images import images
pipe = runtime.Blip2Pipeline.from_dir(sys.argv[1])
pipe.generate_ids(images, max_new_tokens={new}, min_new_tokens={new})
assert "torch" not in sys.modules
# VmHWM: this process's own peak RSS (ru_maxrss would carry over the parent's peak through fork + exec)
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def prepare(preset: str, work: Path) -> tuple[Path, Path]:
    ck = work / "checkpoints" / f"bench-{preset}"
    engine = work / "engines" / f"bench-{preset}" / "onnx"
    if not engine.exists():
        make_random_checkpoint(ck, preset, seed=0)
        print(f"building {engine} (export + parity gate) ...", flush=True)
        build(ck, "onnx", work / "engines", say=lambda m: print("  " + m, flush=True))
    return ck, engine


def hf_caption(model, ck, images, new_tokens: int):
    cfg = model.config
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + ck.prompt_prefix_ids] * len(images))
    pixels = hf_pixel_values(ck, images)
    out = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=cfg.text_config.eos_token_id, pad_token_id=cfg.text_config.pad_token_id)
    return out[:, ids.shape[1]:].tolist()


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_batch(pipe, models, ck, batch: int, new_tokens: int, rounds: int) -> dict:
    images = probe_images(ck.config.vision_config.image_size, count=batch, seed=batch)
    run_pipe = lambda: pipe.generate_ids(images, max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # noqa: E731
    runs = {"onnxruntime": run_pipe, **{k: (lambda m=m: hf_caption(m, ck, images, new_tokens)) for k, m in models.items()}}
    expected = run_pipe()
    for name, fn in runs.items():  # warm-up, and the same tokens on every side
        tokens = fn()
        assert tokens == expected, f"{name} generated other tokens than the pipeline; the comparison would be unfair"
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    ref_name = min((n for n in med if n != "onnxruntime"), key=med.get)
    return {"batch": batch, "new_tokens": new_tokens, "rounds": rounds,
            "median_s": med, "reference": ref_name, "speedup": med[ref_name] / med["onnxruntime"],
            "per_caption_ms": {n: 1000 * v / batch for n, v in med.items()}}


def peak_memory(engine: Path, image_size: int, new_tokens: int, work: Path) -> dict:
    """Peak RSS of a process that imports only the runtime, against the weights' size on disk."""
    probe_dir = work / "memprobe"
    probe_dir.mkdir(exist_ok=True)
    for i, im in enumerate(probe_images(image_size, count=1, seed=5)):
        im.save(probe_dir / f"{i}.png")
    (probe_dir / "export_free_images.py").write_text(f"images = [{str(probe_dir / '0.png')!r}]\n")
    code = MEMORY_PROBE.format(new=new_tokens)
    env = {"PYTHONPATH": f"{ROOT}:{probe_dir}"}
    import os

    out = subprocess.run([sys.executable, "-c", code, str(engine)], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    weights = sum(p.stat().st_size for p in engine.iterdir() if p.suffix in (".onnx", ".data"))
    return {"peak_rss_mb": peak / 2**20, "weights_mb": weights / 2**20, "ratio": peak / weights}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work", default=None, help="folder for the checkpoint and engines (default: a temp folder)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="blip2-edge-bench-"))
    # Flush denormals in PyTorch too (ONNX Runtime sessions do): randomly initialised weights produce
    # denormal activations that make PyTorch's CPU kernels ~20x slower, which would flatter the runtime.
    torch.set_flush_denormal(True)
    ck_dir, engine = prepare(args.preset, work)
    ck = load_checkpoint(ck_dir)
    models = {impl: Blip2ForConditionalGeneration.from_pretrained(ck_dir, attn_implementation=impl).eval()
              for impl in ("eager", "sdpa")}
    pipe = Blip2Pipeline.from_dir(engine)
    n_params = sum(p.numel() for p in models["eager"].parameters())
    print(f"\npreset {args.preset}: {n_params / 1e6:.1f}M parameters, torch threads {torch.get_num_threads()}")
    results = {"preset": args.preset, "params_m": n_params / 1e6, "batches": []}
    for batch in args.batches:
        r = bench_batch(pipe, models, ck, batch, args.new_tokens, args.rounds)
        results["batches"].append(r)
        ms = r["per_caption_ms"]
        print(f"batch {batch:>2}: per caption  onnxruntime {ms['onnxruntime']:8.1f} ms | hf eager {ms['eager']:8.1f} ms"
              f" | hf sdpa {ms['sdpa']:8.1f} ms | speedup vs hf {r['reference']}: {r['speedup']:.2f}x")
    mem = peak_memory(engine, ck.config.vision_config.image_size, args.new_tokens, work)
    results["memory"] = mem
    print(f"runtime-only process: peak RSS {mem['peak_rss_mb']:.0f} MB for {mem['weights_mb']:.0f} MB of weights "
          f"({mem['ratio']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
