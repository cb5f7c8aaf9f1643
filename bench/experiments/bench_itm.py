"""The ITM re-rank step alone (a query's ~90% in bench_retrieval.py): one batch of candidates through the
engine's `qformer_itm` graph in ONNX Runtime fp32, the same graph dynamically quantized to int8 by ONNX
Runtime's `quantize_dynamic`, and PyTorch (`Blip2Edge.itm_forward`), with the same thread count, each side's
rounds back to back.

    python bench/experiments/bench_itm.py                     # the small preset's stage-1 engine of bench_retrieval.py
    python bench/experiments/bench_itm.py --batch 32 --threads 2
    python bench/experiments/bench_itm.py --count-only --preset blip2-opt-2.7b
                                                              # multiply-adds per pair at BLIP-2's size

Prints ms per batch, the ratio against PyTorch, the largest ITM-probability difference from PyTorch, and
whether the candidates' order by probability is PyTorch's. Then the same pairs with one text against the batch's
images (`qformer_itm_one_text`, text -> image re-ranking) and one image against the batch's texts
(`qformer_itm_one_image`), against `qformer_itm` and PyTorch on those pairs, with the share of this machine's fp32
matmul peak (bench/ceiling.py) each reaches; last, one text against the batch's images with each image's
cross-attention keys/values stored in the gallery instead (exported here, timed against qformer_itm_one_text).
First, the multiply-adds per pair of each computation (PyTorch's FlopCounterMode on meta tensors: shapes only, no
weights; `--count-only` stops there, for any preset of train/blip2/presets.py).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from bench import ceiling  # noqa: E402
from bench.bench_retrieval import prepare  # noqa: E402
from runtime.ort_runner import OrtRunner  # noqa: E402
from train.blip2.checkpoint import load_checkpoint  # noqa: E402
from train.blip2.logs import quiet_libraries  # noqa: E402
from train.blip2.presets import image_tokens  # noqa: E402


def session(path: Path, threads: int) -> ort.InferenceSession:
    """The session the runtime opens (runtime.ort_runner.OrtRunner: its options, with threads that sleep between
    runs rather than spin, which would slow PyTorch's)."""
    return OrtRunner(path, threads=threads).session


def match_probability(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e[:, 1] / e.sum(1)


@torch.no_grad()
def timed_blocks(sides: dict, rounds: int) -> dict[str, float]:
    """{name: seconds of `rounds` calls}, each side's calls back to back after one warm-up call: interleaving the
    sides would let one side's thread pools, which keep spinning after a call, slow the next side."""
    seconds = {}
    for name, run in sides.items():
        run()
        t0 = time.perf_counter()
        for _ in range(rounds):
            run()
        seconds[name] = time.perf_counter() - t0
    return seconds


def image_embeds_shape(config, batch: int) -> tuple[int, int, int]:
    """[batch, patches + class token, width]: the vision tower's output, what ITM reads of an image."""
    v = config.vision_config
    return batch, image_tokens(v), v.hidden_size


def multiply_adds(preset: str, text_tokens: int, batch: int) -> dict[str, float]:
    """Multiply-adds per (image, text) pair of Blip2Edge.itm_forward (pair by pair, as Hugging Face computes ITM),
    itm_one_text and itm_one_image (their shared work spread over the `batch` pairs), and of itm_one_text with
    each image's cross-attention keys/values read from the gallery (bench/ceiling.py), counted by PyTorch's
    FlopCounterMode on meta tensors (no weights, nothing run)."""
    from train.blip2.model import Blip2Edge, EdgeConfig
    from train.blip2.presets import blip2_config

    config = blip2_config(preset)
    with torch.device("meta"), torch.no_grad():
        model = Blip2Edge(config, EdgeConfig(stage=1)).eval()
        embeds = torch.empty(image_embeds_shape(config, batch))
        ids = torch.zeros(batch, text_tokens, dtype=torch.long)
        mask = torch.ones_like(ids)
        runs = {"itm_forward": lambda: model.itm_forward(embeds, ids, mask),
                "itm_one_text": lambda: model.itm_one_text(embeds, ids[:1], mask[:1]),
                "itm_one_image": lambda: model.itm_one_image(embeds[:1], ids, mask)}
        counts = {name: ceiling.multiply_adds(run) / batch for name, run in runs.items()}
        counts["itm_one_text with stored keys/values"] = ceiling.stored_keys_values_multiply_adds(
            model, embeds, ids[:1], mask[:1]) / batch
    return counts


def print_multiply_adds(preset: str, text_tokens: int, batch: int) -> None:
    counts = multiply_adds(preset, text_tokens, batch)
    print(f"multiply-adds per pair ({preset}, {batch} pairs x {text_tokens} text tokens): "
          + ", ".join(f"{name} {n / 1e6:,.0f}M" for name, n in counts.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16, help="candidates per batch (bench_retrieval's k=16)")
    ap.add_argument("--text-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    ap.add_argument("--count-only", action="store_true", help="print the multiply-adds per pair and stop (no engine)")
    args = ap.parse_args(argv)
    quiet_libraries()
    print_multiply_adds(args.preset, args.text_tokens, args.batch)
    if args.count_only:
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ck_dir, engine = prepare(args.preset, args.work, max(32, args.batch))
    model = load_checkpoint(ck_dir).model
    rng = np.random.default_rng(0)
    feeds = {"image_embeds": rng.standard_normal(image_embeds_shape(model.config, args.batch)).astype(np.float32),
             "input_ids": rng.integers(5, 1000, (args.batch, args.text_tokens)).astype(np.int64),
             "attention_mask": np.ones((args.batch, args.text_tokens), np.int64)}
    feeds["input_ids"][:, 0] = 101
    torch_feeds = [torch.from_numpy(feeds[n]) for n in ("image_embeds", "input_ids", "attention_mask")]
    with tempfile.TemporaryDirectory() as tmp:
        int8 = Path(tmp) / "qformer_itm.int8.onnx"
        quantize_dynamic(engine / "qformer_itm.onnx", int8, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        runs = {"onnxruntime fp32": session(engine / "qformer_itm.onnx", args.threads),
                "onnxruntime dynamic int8": session(int8, args.threads)}
        with torch.no_grad():
            ref = match_probability(model.itm_forward(*torch_feeds)[0].numpy())
        sides = {name: (lambda s=s: s.run(None, feeds)) for name, s in runs.items()}
        sides["pytorch fp32"] = lambda: model.itm_forward(*torch_feeds)
        seconds = timed_blocks(sides, args.rounds)
        print(f"ITM, {args.batch} candidates x {args.text_tokens} text tokens, {args.threads} thread(s), "
              f"{args.rounds} rounds; PyTorch's probabilities spread over {np.ptp(ref):.2g}")
        for name, total in seconds.items():
            line = f"{name:26s} {total / args.rounds * 1000:7.1f} ms  {seconds['pytorch fp32'] / total:.2f}x PyTorch"
            if name in runs:
                got = match_probability(runs[name].run(["itm_logits"], feeds)[0])
                same = np.array_equal(np.argsort(-got, kind="stable"), np.argsort(-ref, kind="stable"))
                line += f"  max |probability - PyTorch's| {np.abs(got - ref).max():.2g}, same order: {same}"
            print(line)
    shared_pairs(engine, model, feeds, args.threads, args.rounds)
    stored_pairs(engine, model, feeds, args.threads, args.rounds)


def shared_pairs(engine: Path, model, feeds: dict, threads: int, rounds: int) -> None:
    """One text against the batch's images (qformer_itm_one_text) and one image against the batch's texts
    (qformer_itm_one_image), each against qformer_itm and PyTorch's itm_forward on the same pairs."""
    n = len(feeds["input_ids"])
    pairs = {"qformer_itm_one_text": (feeds["image_embeds"], feeds["input_ids"][:1], feeds["attention_mask"][:1]),
             "qformer_itm_one_image": (feeds["image_embeds"][:1], feeds["input_ids"], feeds["attention_mask"])}
    itm = session(engine / "qformer_itm.onnx", threads)
    peak = ceiling.matmul_peak(threads)
    for graph, (embeds, ids, mask) in pairs.items():
        if not (engine / f"{graph}.onnx").exists():
            print(f"{graph}: not in {engine} (built before it; remove the folder to rebuild)")
            continue
        shared = {"image_embeds": embeds, "input_ids": ids, "attention_mask": mask}
        expanded = {name: np.repeat(a, n // len(a), 0) for name, a in shared.items()}
        tensors = [torch.from_numpy(expanded[k]) for k in ("image_embeds", "input_ids", "attention_mask")]
        one = session(engine / f"{graph}.onnx", threads)
        sides = {graph: lambda: one.run(None, shared), "qformer_itm": lambda: itm.run(None, expanded),
                 "pytorch fp32": lambda: model.itm_forward(*tensors)}
        seconds = timed_blocks(sides, rounds)
        with torch.no_grad():
            ref = match_probability(model.itm_forward(*tensors)[0].numpy())
        got = match_probability(one.run(["itm_logits"], shared)[0])
        ms = {name: t / rounds * 1000 for name, t in seconds.items()}
        print(f"{graph} ({n} pairs): {ms[graph]:.1f} ms, qformer_itm {ms['qformer_itm']:.1f} ms "
              f"({ms['qformer_itm'] / ms[graph]:.2f}x), pytorch {ms['pytorch fp32']:.1f} ms "
              f"({ms['pytorch fp32'] / ms[graph]:.2f}x); max |probability - PyTorch's| {np.abs(got - ref).max():.2g}")
        one_side = getattr(model, graph.removeprefix("qformer_"))
        work = {graph: ceiling.multiply_adds(lambda: one_side(*(torch.from_numpy(a) for a in (embeds, ids, mask)))),
                "pytorch fp32": ceiling.multiply_adds(lambda: model.itm_forward(*tensors))}
        print("    share of this machine's fp32 matmul peak (" + f"{peak / 1e9:.1f}G multiply-adds/s): " + ", ".join(
            f"{name} {work[name] / (ms[name] / 1000) / peak:.0%} of it" for name in work))


def stored_pairs(engine: Path, model, feeds: dict, threads: int, rounds: int) -> None:
    """One text against the batch's images as the engine re-ranks (qformer_itm_one_text, keys/values folded into
    the queries' side) and with each image's cross-attention keys/values read from the gallery instead
    (bench/ceiling.py, exported here at static shapes), both in ONNX Runtime: what storing them would gain."""
    graph = engine / "qformer_itm_one_text.onnx"
    if not graph.exists():
        return
    embeds, ids, mask = feeds["image_embeds"], feeds["input_ids"][:1], feeds["attention_mask"][:1]
    tensors = [torch.from_numpy(a) for a in (embeds, ids, mask)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "itm_stored_keys_values.onnx"
        stored = ceiling.export_stored_keys_values(model, *tensors, path)
        runs = {"qformer_itm_one_text": session(graph, threads), "stored keys/values": session(path, threads)}
        inputs = {"qformer_itm_one_text": {"image_embeds": embeds, "input_ids": ids, "attention_mask": mask},
                  "stored keys/values": dict(zip((i.name for i in runs["stored keys/values"].get_inputs()),
                                                 (ids, mask, *stored)))}
        seconds = timed_blocks({name: lambda s=s, f=inputs[name]: s.run(None, f) for name, s in runs.items()}, rounds)
        with torch.no_grad():
            pairs = (t.expand(len(embeds), *t.shape[1:]) for t in tensors)
            ref = match_probability(model.itm_forward(*pairs)[0].numpy())
        ms = {name: t / rounds * 1000 for name, t in seconds.items()}
        diff = {name: np.abs(match_probability(runs[name].run(None, inputs[name])[0]) - ref).max() for name in runs}
        print(f"one text x {len(embeds)} images, keys/values stored in the gallery: {ms['stored keys/values']:.1f} ms "
              f"against qformer_itm_one_text's {ms['qformer_itm_one_text']:.1f} "
              f"({ms['qformer_itm_one_text'] / ms['stored keys/values']:.2f}x); max |probability - PyTorch's| "
              + ", ".join(f"{name} {d:.2g}" for name, d in diff.items()))


if __name__ == "__main__":
    main()
