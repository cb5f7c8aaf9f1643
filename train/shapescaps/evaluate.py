"""Held-out evaluation on the ShapesCaps "val" split, for a PyTorch checkpoint or an exported engine folder.

    python -m train.shapescaps.evaluate --model checkpoints/stage2 --n 200 --out results/torch.json
    python -m train.shapescaps.evaluate --engines engines/stage2/onnx --n 200 --out results/onnx.json
    python -m train eval --engines engines/stage2/onnx-int8 --baseline engines/stage2/onnx   # what int8 costs

    from train.evaluation.backends import PipelineBackend, TorchBackend
    from train.shapescaps.evaluate import evaluate, format_table
    results = evaluate(TorchBackend("checkpoints/stage2"), n=200, seed=0)
    print(format_table(results))

Both backends answer the same five calls, so the same numbers can be shown for PyTorch and for the
exported pipeline: `TorchBackend` runs the checkpoint (captions and answers with Hugging Face's
`generate`, greedy; ITC/ITM through `train.blip2.model.Blip2Edge`), `PipelineBackend` runs the engine folder
through `runtime.Blip2Pipeline` (no torch involved). Both read the same images at the model's input size.

Metrics, over the first `n` samples of `ShapesCaps("val", n=n, image_size=<model's>, seed=seed)`:

* caption accuracy: fraction of images whose greedy caption (LLM, no prompt) passes
  `train.shapescaps.synthetic.caption_correct` (every shape's colour, shape and position right, nothing extra);
* ITC recall@1, image->text and text->image: n images against one caption per image (`captions[0]`),
  similarity = largest cosine over the image's queries. Synthetic images repeat their semantics, so
  EQUIVALENCE: a retrieved item counts as correct when the text describes the image, i.e. the
  caption passes `caption_correct` for the image (the caption-accuracy rule: every colour, shape and
  position right, nothing extra). Exact recall (only the query's own pair counts) is reported beside
  it as `exact_value`;
* ITM accuracy: for each image its own caption (label 1) and the caption (`captions[0]`) of another
  sample whose shapes are not equivalent (label 0); predicted "match" when the probability > 0.5;
  accuracy over the 2n pairs. NEGATIVES are chosen, per image and deterministically from the seed,
  among samples whose multiset of (colour, shape, position) differs from the image's (stricter than
  "not equivalent": some captions leave out sizes, and a caption of a shape that differs only in size
  would still describe the image truthfully);
* VQA exact match: one question per image from `sample.qa`, chosen deterministically from the seed,
  prompted as `train.training.datasets.qa_prompt(question)` and answered greedily;
  `train.shapescaps.synthetic.vqa_correct`.

A capability the model lacks (no LLM: a stage-1 folder; no Q-Former text side: a plain stage-2
folder) is skipped: its metrics are reported as "n/a" with the reason (`value` null, `status` "n/a"
in the JSON). Targets: caption >= 0.90, ITC R@1 >= 0.90 both ways, ITM >= 0.95, VQA >= 0.90.

`python -m train eval` uses `add_arguments` and `run` from here.
"""
import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.retrieval import similarity  # BLIP-2's ITC: max over queries (the runtime's own)
from train.shapescaps.synthetic import ShapesCaps, caption_correct, vqa_correct
from train.evaluation.backends import ANSWER_TOKENS, BATCH_SIZE, CAPTION_TOKENS, EvaluationError, chunks, open_backend

SPLIT = "val"

# metric -> (label, target, capability it needs)
METRICS = {
    "caption_accuracy": ("caption accuracy", 0.90, "caption"),
    "itc_r1_i2t": ("ITC R@1 image->text", 0.90, "itc"),
    "itc_r1_t2i": ("ITC R@1 text->image", 0.90, "itc"),
    "itm_accuracy": ("ITM accuracy", 0.95, "itm"),
    "vqa_accuracy": ("VQA exact match", 0.90, "vqa"),
}

EQUIVALENCE = ("a retrieved item counts as correct when the text describes the image (caption_correct: every "
               "colour, shape and position right, nothing extra); exact_value counts only the query's own pair")
NEGATIVES = ("for each image: its own captions[0] (label 1) and captions[0] of another sample (label 0) chosen "
             "deterministically from the seed among samples whose multiset of (colour, shape, position) differs "
             "from the image's (so the negative is never equivalent, and stays false even when it omits sizes); "
             "match predicted when the probability > 0.5")
QUESTIONS = "one question per image from sample.qa, chosen deterministically from the seed; normalised exact match"

# SeedSequence tags of the per-sample choices, so adding samples never changes earlier ones
_VQA_STREAM, _ITM_STREAM = 101, 102


# ----------------------------------------------------------------------------- metric logic

def shapes_key(sample) -> tuple:
    """The equivalence class of a sample: its shapes as a sorted multiset of (colour, shape, size, position)."""
    return tuple(sorted((s.colour, s.shape, s.size, s.position) for s in sample.shapes))


def layout_key(sample) -> tuple:
    """What every caption of a sample states: its shapes' (colour, shape, position), as a sorted multiset."""
    return tuple(sorted((s.colour, s.shape, s.position) for s in sample.shapes))


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def pick_questions(samples, seed: int) -> list[tuple[str, str]]:
    """One (question, answer) per sample, a pure function of (seed, sample index)."""
    out = []
    for s in samples:
        if not s.qa:
            raise EvaluationError(f"sample {s.index} has no questions; VQA needs ShapesCaps samples")
        out.append(s.qa[int(_rng(seed, s.index, _VQA_STREAM).integers(len(s.qa)))])
    return out


def pick_negatives(samples, seed: int, extra=None) -> list:
    """For each sample, another sample whose (colour, shape, position) multiset differs (so its shapes are
    never equivalent), chosen from `samples` with a per-sample generator seeded by (seed, index). When no
    sample qualifies (tiny n), the first qualifying one of `extra` (an iterable of further samples) is used."""
    keys = [layout_key(s) for s in samples]
    out = []
    for s, key in zip(samples, keys):
        candidates = [j for j, k in enumerate(keys) if k != key]
        if candidates:
            out.append(samples[candidates[int(_rng(seed, s.index, _ITM_STREAM).integers(len(candidates)))]])
            continue
        found = next((o for o in (extra or ()) if layout_key(o) != key), None)
        if found is None:
            raise EvaluationError(f"no sample with other shapes than sample {s.index} to use as an ITM negative")
        out.append(found)
    return out


def recall_at_1(sim: np.ndarray, keys: list | None = None, describes: np.ndarray | None = None) -> dict:
    """Recall@1 both ways for a square similarity [n images, n texts], text i being image i's caption.

    A hit is a top-1 item that is equivalent to the query: `describes[i, t]` (text t describes image i)
    when given, else equal `keys`; `exact` counts only the query's own pair. Ties go to the lower index."""
    n = sim.shape[0]
    if describes is None:
        describes = np.array([[keys[i] == keys[t] for t in range(n)] for i in range(n)])
    if sim.shape != (n, n) or describes.shape != (n, n):
        raise ValueError(f"similarity is {sim.shape}, expected ({n}, {n})")
    i2t, t2i = sim.argmax(1), sim.argmax(0)
    idx = np.arange(n)
    return {
        "i2t": float(np.mean([describes[i, t] for i, t in enumerate(i2t)])),
        "t2i": float(np.mean([describes[i, t] for t, i in enumerate(t2i)])),
        "i2t_exact": float(np.mean(i2t == idx)), "t2i_exact": float(np.mean(t2i == idx)),
        "i2t_top1": i2t.tolist(), "t2i_top1": t2i.tolist(),
    }


def _batched(fn, size: int, *columns) -> list:
    out = []
    for part in chunks(len(columns[0]), size):
        out.extend(fn(*(c[part] for c in columns)))
    return out


def _batched_array(fn, size: int, *columns) -> np.ndarray:
    return np.concatenate([np.asarray(fn(*(c[part] for c in columns))) for part in chunks(len(columns[0]), size)])


def _metric(name: str, value=None, reason: str | None = None, **extra) -> dict:
    label, target, _ = METRICS[name]
    if value is None:
        return {"label": label, "value": None, "status": "n/a", "reason": reason, "target": target, "passed": None,
                **extra}
    return {"label": label, "value": float(value), "status": "ok", "target": target,
            "passed": bool(value >= target), **extra}


@dataclass
class Split:
    """The evaluated samples and what every metric reads of them."""
    samples: list
    images: list
    captions: list[str]  # captions[0] of each sample
    seed: int
    per_sample: list[dict]  # one row per sample, filled in by each metric

    @property
    def n(self) -> int:
        return len(self.samples)


def caption_metric(backend, split: Split, batch_size: int, tokens: int = CAPTION_TOKENS) -> dict:
    t0 = time.perf_counter()
    preds = _batched(lambda im: backend.caption(im, max_new_tokens=tokens), batch_size, split.images)
    ok = [caption_correct(p, s) for p, s in zip(preds, split.samples)]
    for row, p, c in zip(split.per_sample, preds, ok):
        row.update(caption_pred=p, caption_correct=c)
    return {"caption_accuracy": _metric("caption_accuracy", np.mean(ok), correct=int(sum(ok)), total=split.n,
                                        seconds=time.perf_counter() - t0, max_new_tokens=tokens)}


def itc_metrics(backend, split: Split, batch_size: int) -> dict:
    t0 = time.perf_counter()
    image_feats = _batched_array(backend.image_feats, batch_size, split.images)
    text_feats = _batched_array(backend.text_feats, batch_size, split.captions)
    describes = np.array([[caption_correct(c, sample) for c in split.captions] for sample in split.samples])
    r = recall_at_1(similarity(image_feats, text_feats), describes=describes)
    seconds = time.perf_counter() - t0
    for row, i2t, t2i in zip(split.per_sample, r["i2t_top1"], r["t2i_top1"]):
        row.update(i2t_top1=i2t, t2i_top1=t2i)
    return {f"itc_r1_{way}": _metric(f"itc_r1_{way}", r[way], exact_value=r[f"{way}_exact"],
                                     correct=round(r[way] * split.n), total=split.n, seconds=seconds,
                                     rule=EQUIVALENCE) for way in ("i2t", "t2i")}


def itm_metric(backend, split: Split, batch_size: int) -> dict:
    t0 = time.perf_counter()
    n = split.n
    more = ShapesCaps(SPLIT, n=n + 1000, image_size=backend.image_size, seed=split.seed)  # same samples, more of them
    negatives = pick_negatives(split.samples, split.seed,
                               (more.sample(j, render_image=False) for j in range(n, n + 1000)))
    pair_texts = split.captions + [neg.captions[0] for neg in negatives]
    labels = np.array([1] * n + [0] * n)
    probs = _batched_array(backend.itm, batch_size, split.images + split.images, pair_texts).astype(np.float64)
    hits = (probs > 0.5) == labels.astype(bool)
    for i, row in enumerate(split.per_sample):
        row.update(itm_negative_index=negatives[i].index, itm_negative=pair_texts[n + i],
                   itm_pos_prob=float(probs[i]), itm_neg_prob=float(probs[n + i]))
    return {"itm_accuracy": _metric("itm_accuracy", hits.mean(), correct=int(hits.sum()), total=2 * n,
                                    positives_accuracy=float(hits[:n].mean()),
                                    negatives_accuracy=float(hits[n:].mean()),
                                    seconds=time.perf_counter() - t0, rule=NEGATIVES)}


def vqa_metric(backend, split: Split, batch_size: int, tokens: int = ANSWER_TOKENS) -> dict:
    t0 = time.perf_counter()
    qa = pick_questions(split.samples, split.seed)
    preds = _batched(lambda im, q: backend.answer(im, q, max_new_tokens=tokens), batch_size, split.images,
                     [q for q, _ in qa])
    ok = [vqa_correct(p, a) for p, (_, a) in zip(preds, qa)]
    for row, (q, a), p, c in zip(split.per_sample, qa, preds, ok):
        row.update(question=q, answer=a, answer_pred=p, vqa_correct=c)
    return {"vqa_accuracy": _metric("vqa_accuracy", np.mean(ok), correct=int(sum(ok)), total=split.n,
                                    seconds=time.perf_counter() - t0, max_new_tokens=tokens, rule=QUESTIONS)}


# capability -> (the metric function, the metrics it returns)
METRIC_FUNCTIONS = {
    "caption": (caption_metric, ("caption_accuracy",)),
    "itc": (itc_metrics, ("itc_r1_i2t", "itc_r1_t2i")),
    "itm": (itm_metric, ("itm_accuracy",)),
    "vqa": (vqa_metric, ("vqa_accuracy",)),
}


def load_split(n: int, seed: int, image_size: int) -> Split:
    ds = ShapesCaps(SPLIT, n=n, image_size=image_size, seed=seed)
    samples = [ds[i] for i in range(n)]
    per_sample = [{"index": s.index, "shapes": [list(k) for k in shapes_key(s)], "caption": s.captions[0]}
                  for s in samples]
    return Split(samples, [s.image for s in samples], [s.captions[0] for s in samples], seed, per_sample)


def evaluate(backend, n: int = 200, seed: int = 0, batch_size: int = BATCH_SIZE,
             caption_tokens: int = CAPTION_TOKENS, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """Every metric the backend can serve on the first `n` val samples; see the module docstring."""
    for what, v, low in (("n", n, 1), ("seed", seed, 0), ("batch_size", batch_size, 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise EvaluationError(f"{what} must be an integer >= {low}, got {v!r}")
    started = time.perf_counter()
    split = load_split(n, seed, backend.image_size)
    seconds = {"data": time.perf_counter() - started}
    missing = getattr(backend, "missing", {})
    options = {"caption": {"tokens": caption_tokens}, "vqa": {"tokens": answer_tokens}}
    metrics = {}
    for capability in ("caption", "itc", "itm", "vqa"):
        function, names = METRIC_FUNCTIONS[capability]
        if capability in backend.capabilities:
            metrics.update(function(backend, split, batch_size, **options.get(capability, {})))
            seconds[capability] = metrics[names[0]]["seconds"]
        else:
            reason = missing.get(capability) or f"the backend has no {capability}"
            metrics.update({name: _metric(name, reason=reason) for name in names})
    seconds["total"] = time.perf_counter() - started
    describe = backend.describe() if hasattr(backend, "describe") else {"backend": getattr(backend, "name", "?")}
    return {
        **describe,
        "data": {"dataset": "ShapesCaps", "split": SPLIT, "n": n, "seed": seed, "image_size": backend.image_size},
        "n": n, "seed": seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "equivalence": EQUIVALENCE, "itm_negatives": NEGATIVES, "vqa_questions": QUESTIONS,
        "metrics": {name: metrics[name] for name in METRICS},
        "passed": all(m["passed"] for m in metrics.values() if m["status"] == "ok"),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "per_sample": split.per_sample,
    }


# ----------------------------------------------------------------------------- report

def _secs(s: float) -> str:
    return f"{s:.1f}s" if s >= 1 else f"{s:.2f}s"


def format_table(results: dict) -> str:
    """Plain text table, one row per metric: metric | value | target | result | time."""
    rows = [("metric", "value", "target", "result", "time")]
    notes = []
    for name, m in results["metrics"].items():
        target = f">= {m['target']:.2f}"
        if m["status"] == "n/a":
            rows.append((m["label"], "n/a", target, "n/a", ""))
            notes.append(f"{m['label']}: n/a, {m['reason']}")
            continue
        value = f"{m['value']:.3f} ({m['correct']}/{m['total']})"
        rows.append((m["label"], value, target, "pass" if m["passed"] else "FAIL", _secs(m["seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    head = (f"ShapesCaps {results['data']['split']}, n={results['n']}, seed={results['seed']}, "
            f"image size {results['data']['image_size']}: {results.get('backend', '?')} {results.get('folder', '')}")
    out = [head, line(rows[0]), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
    available = [m for m in results["metrics"].values() if m["status"] == "ok"]
    out.append(f"{sum(m['passed'] for m in available)}/{len(available)} available metrics meet their target "
               f"(total {_secs(results['seconds']['total'])})")
    return "\n".join(out + notes)


# What a reduced-precision folder may lose against its fp32 baseline, in points (0.01) per metric.
ALLOWED_LOSS = {"fp16": 0.5, "int8": 2.0}


def format_comparison(base: dict, results: dict) -> str:
    """Metric by metric, the baseline's value beside these results, the change in points, and whether the
    change stays within what this precision may lose (ALLOWED_LOSS; a gain always passes)."""
    precision = results.get("precision")
    allowed = ALLOWED_LOSS.get(precision)
    rows = [("metric", f"baseline ({base.get('precision') or base.get('backend')})", precision or "this",
             "change (points)", "within" if allowed is None else f"within {allowed} points")]
    for name, m in results["metrics"].items():
        b = base["metrics"].get(name)
        if m["status"] != "ok" or b is None or b["status"] != "ok":
            rows.append((m["label"], "n/a", "n/a", "", ""))
            continue
        change = 100 * (m["value"] - b["value"])
        verdict = "" if allowed is None else ("yes" if change >= -allowed else "NO")
        rows.append((m["label"], f"{b['value']:.3f}", f"{m['value']:.3f}", f"{change:+.1f}", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([f"against {base.get('folder', '')}:", line(rows[0]), "-+-".join("-" * w for w in widths)]
                     + [line(r) for r in rows[1:]])


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The evaluation options (for `python -m train eval` and `python -m train.shapescaps.evaluate`)."""
    parser.add_argument("--model", metavar="DIR", help="checkpoint folder, evaluated with PyTorch")
    parser.add_argument("--engines", metavar="DIR", help="engine folder (engines/<name>/<target>), evaluated with "
                        "the runtime pipeline")
    parser.add_argument("--n", type=int, help="number of val samples (default 200; with --data, every example)")
    parser.add_argument("--seed", type=int, default=0, help="ShapesCaps seed; also picks questions and ITM "
                        "negatives (default 0)")
    parser.add_argument("--out", metavar="results.json", help="write the results (every metric, per-sample "
                        "predictions) as JSON")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"images per call (default {BATCH_SIZE})")
    parser.add_argument("--data", metavar="VAL", help="your held-out data instead of ShapesCaps (COCO captions "
                        "*.json with --images, *.jsonl, or WebDataset *.tar): BLEU-4/CIDEr, VQAv2 accuracy, "
                        "retrieval recall@1/5/10 (train/evaluation/tasks.py)")
    parser.add_argument("--images", metavar="DIR", help="--data COCO captions: the image folder")
    parser.add_argument("--task", action="append", choices=["caption", "vqa", "retrieval"],
                        help="with --data: what to evaluate (repeatable; default every task the data and model allow)")
    parser.add_argument("--prompt", help="with --data: the LLM prompt before captions (a model fine-tuned by "
                        "`finetune --task caption` was trained after 'a photo of')")
    parser.add_argument("--qformer-question", action="store_true", help="with --data --task vqa: the question "
                        "also goes to the Q-Former (as `finetune --task vqa` trains)")
    parser.add_argument("--k", type=int, default=16, help="with --data: retrieval candidates re-ranked by ITM "
                        "(default 16)")
    parser.add_argument("--baseline", metavar="DIR", help="another engine folder (e.g. engines/NAME/onnx) or "
                        "checkpoint to evaluate alike and compare with, metric by metric (fp16 may lose 0.5 "
                        "points, int8 2 points)")
    return parser


def _expected_errors() -> tuple:
    """Errors whose message already says what to fix. Looked up lazily: evaluating an engine folder must not
    import torch (train.blip2.checkpoint is only loaded, and can only raise, when a --model folder is opened)."""
    from runtime.errors import Blip2EdgeError

    from train.training.datasets import DataError

    errors = [EvaluationError, Blip2EdgeError, DataError]
    if "train.blip2.checkpoint" in sys.modules:
        errors.append(sys.modules["train.blip2.checkpoint"].CheckpointError)
    return tuple(errors)


def run(args) -> int:
    """Evaluate, print the table, write --out; 0 on success (whether or not targets are met), 1 on an error."""
    out = getattr(args, "out", None)
    try:
        if out is not None and Path(out).is_dir():
            raise EvaluationError(f"--out {out} is a folder; pass a file name such as {Path(out) / 'results.json'}")
        backend = open_backend(model=getattr(args, "model", None), engines=getattr(args, "engines", None))
        if getattr(args, "data", None) is not None:
            from train.evaluation.tasks import run_on_data

            return run_on_data(args, backend, out)
        n = 200 if args.n is None else args.n
        results = evaluate(backend, n=n, seed=args.seed, batch_size=getattr(args, "batch_size", BATCH_SIZE))
        baseline = getattr(args, "baseline", None)
        if baseline is not None:
            is_engine = (Path(baseline) / "manifest.json").is_file()
            base = evaluate(open_backend(model=None if is_engine else baseline,
                                         engines=baseline if is_engine else None),
                            n=n, seed=args.seed, batch_size=getattr(args, "batch_size", BATCH_SIZE))
            results["baseline"] = base
    except Exception as e:
        if not isinstance(e, _expected_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if "baseline" in results:
        print(format_comparison(results["baseline"], results))
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.shapescaps.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
