"""Per-caption latency of the ONNX Runtime pipeline against Hugging Face `generate`, and runtime memory.

    python bench/bench_caption.py                         # small preset (~30M params), batch 1 and 8, fp32
    python bench/bench_caption.py --targets onnx onnx-fp16 onnx-int8     # reduced precision beside fp32
    python bench/bench_caption.py --targets onnx trt-fp16 trt-int8       # on a GPU machine with TensorRT
    python bench/bench_caption.py --preset tiny --rounds 5 --batches 1 4
    python bench/bench_caption.py --targets onnx onnx-int8 --json bench/results/caption.json   # for bench/report.py

Same model, same images: every side generates exactly `--new-tokens` tokens (min_new_tokens =
max_new_tokens) greedily from the same pixels, so every side does the same amount of work. The fp32
pipeline must make PyTorch's choice at every step (fed PyTorch's previous tokens) except where PyTorch's two
best logits tie (closer than 1e-3: summation order breaks a tie either way); for fp16/int8 the token agreement
with PyTorch fp32 is printed beside the timing, free-running (greedy) and teacher-forced (each step fed
PyTorch's previous tokens), with the median gap between PyTorch's best and second-best logit: a random
model's near-flat logits make near-ties, where any rounding flips a token and greedy generation then
goes its own way (`--checkpoint` benchmarks a trained model instead). Each round times every pipeline, HF eager
and HF sdpa back to back (interleaved, so drift hits all alike); the medians are reported, and the ratio
is taken against the faster PyTorch variant (fp32). Timings include image preprocessing on both sides.

Memory and size: a fresh process that imports only `runtime` loads each engine folder and captions; its
peak RSS is printed beside the size of the graphs on disk.

The targets (docs/testing.md, held on the default `small` preset): `onnx` at least 2.0x faster than PyTorch at
batch 1 and 1.5x at batch 8, `onnx-int8` 3x at batch 1; `--json` writes them beside the figures (`--no-targets`:
the figures alone, for other presets and checkpoints).
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Blip2ForConditionalGeneration  # noqa: E402

from bench.common import (  # noqa: E402
    Headline, checkpoint_folder, engine_folder, held_target, interleaved_medians, write_results)
from export.build import TARGETS  # noqa: E402
from export.parity import probe_images, token_agreement  # noqa: E402
from runtime import Blip2Pipeline  # noqa: E402
from train.blip2.checkpoint import load_checkpoint  # noqa: E402
from train.blip2.logs import quiet_libraries  # noqa: E402
from train.blip2.reference import HfReference  # noqa: E402

MEMORY_PROBE = """
import sys
import runtime
from bench.common import proc_bytes
from export_free_images import images
pipe = runtime.Blip2Pipeline.from_dir(sys.argv[1], shared_pool=True)
pipe.generate_ids(images, max_new_tokens={new}, min_new_tokens={new})
assert "torch" not in sys.modules
print(proc_bytes())  # VmHWM: this process's own peak RSS
"""

# (batch, target) -> the speed ratio against PyTorch it is held to (docs/testing.md, on the default small preset)
SPEEDUP_TARGETS = {(1, "onnx"): 2.0, (8, "onnx"): 1.5, (1, "onnx-int8"): 3.0}


def prepare(preset: str, work: Path, targets: list[str], checkpoint: str | None = None) -> tuple[Path, dict[str, Path]]:
    ck = Path(checkpoint) if checkpoint else checkpoint_folder(work / "checkpoints" / f"bench-{preset}", preset)
    return ck, {target: engine_folder(ck, target, work / "engines") for target in targets}


def hf_caption(reference: HfReference, images, new_tokens: int, margins: bool = False):
    """New token ids per image from Hugging Face's generate(pixel_values=...) (and, with margins, the gap between
    the best and second-best logit of each step, EOS left out as min_new_tokens leaves it out)."""
    out = reference.generate(images, None, output_logits=margins, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens)
    if not margins:
        return out.tokens
    eos = reference.ck.config.text_config.eos_token_id
    logits = torch.stack(out.logits).float()  # [batch, steps, V]
    logits[..., eos] = float("-inf")
    top2 = logits.topk(2, dim=-1).values
    return out.tokens, (top2[..., 0] - top2[..., 1]).transpose(0, 1).flatten().tolist()  # step-major


TIE = 1e-3  # PyTorch's best two logits closer than this: a tie, which summation order may break either way


def first_differences(rows, expected) -> list[tuple[int, int]]:
    """(row, step) of the first token that differs in each row that differs."""
    return [(b, next(t for t, (g, w) in enumerate(zip(got, want)) if g != w))
            for b, (got, want) in enumerate(zip(rows, expected)) if got != want]


def differences_beyond_ties(picks, expected, margins) -> list[tuple[int, int]]:
    """(row, step) where the pipeline's choice differs from PyTorch's although PyTorch's choice was no tie."""
    return [(b, t) for b, (got, want) in enumerate(zip(picks, expected)) for t, (g, w) in enumerate(zip(got, want))
            if g != w and margins[t][b] > TIE]


def teacher_forced_choices(pipe, images, expected: list[list[int]], eos: int) -> list[list[int]]:
    """The pipeline's top choice at every position of `expected`, fed its previous tokens (EOS banned)."""
    scores = pipe.score(images, expected)
    for s in scores:
        s[:, eos] = -np.inf
    return [s.argmax(-1).tolist() for s in scores]


def bench_batch(pipes: dict, models: dict, batch: int, new_tokens: int, rounds: int) -> dict:
    ck = models["eager"].ck
    images = probe_images(ck.config.vision_config.image_size, count=batch, seed=batch)
    runs = {target: (lambda p=p: p.generate_ids(images, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
            for target, p in pipes.items()}
    runs.update({k: (lambda m=m: hf_caption(m, images, new_tokens)) for k, m in models.items()})
    with torch.inference_mode():
        expected, margins = hf_caption(models["eager"], images, new_tokens, margins=True)
    margins = np.array(margins).reshape(new_tokens, batch)  # [step, row]
    agreement, forced = {}, {}
    eos = ck.config.text_config.eos_token_id
    for name, fn in runs.items():  # warm-up; fp32 must make PyTorch's choices, fp16/int8 report their agreement
        tokens = fn()
        agreement[name] = token_agreement(tokens, expected)
        if name in pipes:
            picks = teacher_forced_choices(pipes[name], images, expected, eos)
            forced[name] = token_agreement(picks, expected)
            if name == "onnx":
                wrong = differences_beyond_ties(picks, expected, margins)
                assert not wrong, f"fp32 pipeline chose other tokens than PyTorch at (row, step) {wrong}, not ties"
        elif name in models:  # free-running: the first difference in each row must be at a tie
            wrong = [(b, t) for b, t in first_differences(tokens, expected) if margins[t][b] > TIE]
            assert not wrong, f"hf {name} generated other tokens than hf eager at (row, step) {wrong}, not ties"
    with torch.inference_mode():
        med = interleaved_medians(runs, rounds)
    ref_name = min(models, key=med.get)
    return {"batch": batch, "new_tokens": new_tokens, "rounds": rounds, "median_s": med, "reference": ref_name,
            "speedup": {t: med[ref_name] / med[t] for t in pipes}, "token_agreement": agreement,
            "teacher_forced_agreement": forced, "median_logit_margin": float(np.median(margins)),
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
    out = subprocess.run([sys.executable, "-c", code, str(engine)], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    weights = sum(p.stat().st_size for p in engine.iterdir() if p.suffix in (".onnx", ".data", ".engine"))
    return {"peak_rss_mb": peak / 2**20, "weights_mb": weights / 2**20, "ratio": peak / weights}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="random model preset to benchmark (default: small)")
    ap.add_argument("--checkpoint", help="benchmark this stage-2 checkpoint instead (e.g. one trained with "
                    "`python -m train demo`: a trained model's clear top choices make token agreement meaningful)")
    ap.add_argument("--targets", nargs="+", default=["onnx"], choices=list(TARGETS),
                    help="engine targets to time against PyTorch fp32 (default: onnx; trt-* need TensorRT and a GPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work", default=None, help="folder for the checkpoint and engines (default: a temp folder)")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    ap.add_argument("--no-targets", action="store_true", help="write the figures without the targets (which are held "
                    "on the default small preset) beside them: for other presets and checkpoints, shown for context")
    args = ap.parse_args(argv)
    quiet_libraries()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="blip2-edge-bench-"))
    # Flush denormals in PyTorch too (ONNX Runtime sessions do): randomly initialised weights produce
    # denormal activations that make PyTorch's CPU kernels ~20x slower, which would flatter the runtime.
    torch.set_flush_denormal(True)
    ck_dir, engines = prepare(args.preset, work, args.targets, args.checkpoint)
    ck = load_checkpoint(ck_dir)
    models = {impl: HfReference(ck, Blip2ForConditionalGeneration.from_pretrained(ck_dir, attn_implementation=impl)
                                .eval()) for impl in ("eager", "sdpa")}
    # one shared ONNX Runtime thread pool, as the command line uses (this process runs nothing else on it)
    pipes = {target: Blip2Pipeline.from_dir(engine, shared_pool=True) for target, engine in engines.items()}
    n_params = sum(p.numel() for p in models["eager"].model.parameters())
    label = f"checkpoint {ck_dir}" if args.checkpoint else f"preset {args.preset} (random weights)"
    print(f"\n{label}: {n_params / 1e6:.1f}M parameters, torch threads {torch.get_num_threads()}")
    results = {"preset": None if args.checkpoint else args.preset, "checkpoint": args.checkpoint,
               "params_m": n_params / 1e6, "batches": [], "memory": {}}
    for batch in args.batches:
        r = bench_batch(pipes, models, batch, args.new_tokens, args.rounds)
        results["batches"].append(r)
        ms = r["per_caption_ms"]
        print(f"batch {batch:>2}: per caption  hf eager {ms['eager']:8.1f} ms | hf sdpa {ms['sdpa']:8.1f} ms | "
              f"median gap between PyTorch's best and second-best logit {r['median_logit_margin']:.3g}")
        for target in pipes:
            print(f"          {target:<10} {ms[target]:8.1f} ms | {r['speedup'][target]:.2f}x faster than hf "
                  f"{r['reference']} | token agreement with PyTorch fp32: greedy {r['token_agreement'][target]:.3f}, "
                  f"teacher-forced {r['teacher_forced_agreement'][target]:.3f}")
    for target, engine in engines.items():
        mem = peak_memory(engine, ck.config.vision_config.image_size, args.new_tokens, work)
        results["memory"][target] = mem
        print(f"{target:<10} on disk {mem['weights_mb']:6.1f} MB | runtime-only process peak RSS "
              f"{mem['peak_rss_mb']:.0f} MB ({mem['ratio']:.2f}x the graphs)")
    if args.json:
        write_results(args.json, f"caption: {label}", results, headline(results, not args.no_targets))


def headline(results: dict, held: bool) -> list[Headline]:
    """Each target's speed against PyTorch per batch size (held to SPEEDUP_TARGETS), then its runtime-only memory."""
    out = []
    for r in results["batches"]:
        ms, ref = r["per_caption_ms"], r["reference"]
        for name, speedup in r["speedup"].items():
            bound = SPEEDUP_TARGETS.get((r["batch"], name))
            out.append(Headline(
                f"batch {r['batch']}: {name} / Hugging Face generate, per-caption speed", speedup, "x",
                *held_target(">=", bound, held and bound is not None),
                f"{ms[name]:.1f} against {ms[ref]:.1f} ms per caption (hf {ref}); token agreement with PyTorch fp32: "
                f"greedy {r['token_agreement'][name]:.3f}, teacher-forced {r['teacher_forced_agreement'][name]:.3f}"))
    for name, mem in results["memory"].items():
        out.append(Headline(f"{name}: runtime-only process peak RSS / graphs on disk", mem["ratio"], "x",
                            note=f"{mem['peak_rss_mb']:.0f} MB against {mem['weights_mb']:.1f} MB"))
    return out


if __name__ == "__main__":
    main()
