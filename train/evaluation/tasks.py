"""Standard metrics on a user's held-out data, for a checkpoint (PyTorch) or an engine folder (no torch).

    python -m train eval --model runs/caption --data val.jsonl                       # every task the data allows
    python -m train eval --engines engines/caption/onnx --data captions_val.json --images val/ --task caption
    python -m train eval --model runs/vqa --data vqa_val.jsonl --task vqa --qformer-question

* caption: greedy captions (after `--prompt`, the prompt the model was fine-tuned with: "a photo of" for
  `finetune --task caption`) scored with BLEU-4 and CIDEr against every reference caption of the image
  (train.evaluation.metrics: pycocoevalcap's scorers);
* vqa: greedy answers to "Question: ... Answer:" (with `--qformer-question`, the question also goes to the
  Q-Former, as `finetune --task vqa` trains), VQAv2 accuracy;
* retrieval: BLIP-2's two steps: ITC similarities between every image and every caption, then the top
  `--k` candidates of each query re-ranked by ITM probability; recall@1/5/10 image->text (right when any
  of the image's captions is retrieved) and text->image.

The first `--n` examples of the data are evaluated (all by default).
"""
import json
import time
from pathlib import Path

import numpy as np

from runtime.retrieval import similarity
from train.evaluation.backends import EvaluationError
from train.evaluation.metrics import caption_scores, retrieval_recall, vqa_accuracy
from train.training.datasets import qa_prompt

CAPTION_TOKENS = 30
ANSWER_TOKENS = 10


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _images(data, indices, size: int):
    for part in _batches(list(indices), size):
        yield [data.load(i) for i in part]


def caption_task(backend, data, indices, batch_size: int, prompt: str | None) -> dict:
    preds = []
    for images in _images(data, indices, batch_size):
        preds += backend.caption(images, max_new_tokens=CAPTION_TOKENS, prompt=prompt)
    refs = {str(i): list(data.examples[i].captions) for i in indices}
    scores = caption_scores({str(i): p for i, p in zip(indices, preds)}, refs)
    return {**scores, "images": len(indices), "prompt": prompt,
            "examples": [{"image": data.examples[i].image, "caption": p} for i, p in zip(indices[:20], preds)]}


def vqa_task(backend, data, indices, batch_size: int, qformer_question: bool) -> dict:
    preds = []
    for part in _batches(list(indices), batch_size):
        questions = [data.examples[i].question for i in part]
        preds += backend.answer([data.load(i) for i in part], questions, max_new_tokens=ANSWER_TOKENS,
                                qformer_question=qformer_question)
    answers = [list(data.examples[i].answers) for i in indices]
    return {"vqa_accuracy": vqa_accuracy(preds, answers), "questions": len(indices),
            "prompt": qa_prompt("<question>"), "qformer_question": qformer_question,
            "examples": [{"question": data.examples[i].question, "answer": p} for i, p in zip(indices[:20], preds)]}


def _rerank(itc: np.ndarray, k: int, itm) -> np.ndarray:
    """Rows of `itc` [Q, C] with each row's top k candidates re-scored by `itm(query, candidates)` (placed above
    the rest: ITM probabilities + 2 > any cosine)."""
    scores = itc.astype(np.float64).copy()
    for q in range(itc.shape[0]):
        top = np.argsort(-itc[q], kind="stable")[:k]
        scores[q, top] = 2.0 + np.asarray(itm(q, top), dtype=np.float64)
    return scores


def retrieval_task(backend, data, indices, batch_size: int, k: int) -> dict:
    images = [img for part in _images(data, indices, batch_size) for img in part]
    texts, text_image = [], []
    for row, i in enumerate(indices):
        texts += list(data.examples[i].captions)
        text_image += [row] * len(data.examples[i].captions)
    image_feats, embeds = backend.gallery(images, batch_size)  # each image through the ViT once
    text_feats = np.concatenate([backend.text_feats(p) for p in _batches(texts, batch_size)])
    itc = similarity(image_feats, text_feats)  # [I, T]
    k = min(k, len(texts), len(images))
    t0 = time.perf_counter()

    def itm(image_rows, text_rows):
        return np.concatenate([backend.gallery_itm(embeds, im, [texts[t] for t in tx])
                               for im, tx in zip(_batches(image_rows, batch_size), _batches(text_rows, batch_size))])

    i2t = _rerank(itc, k, lambda q, top: itm([q] * len(top), list(top)))
    t2i = _rerank(itc.T, k, lambda q, top: itm(list(top), [q] * len(top))).T
    labels = np.array(text_image)
    out = {name: v for name, v in retrieval_recall(i2t, labels).items() if name.startswith("i2t")}
    out.update({name: v for name, v in retrieval_recall(t2i, labels).items() if name.startswith("t2i")})
    return {**out, "itc_only": retrieval_recall(itc, labels), "k": k, "images": len(images), "texts": len(texts),
            "itm_seconds": round(time.perf_counter() - t0, 3)}


def evaluate_data(backend, data, tasks: list[str], n: int | None = None, batch_size: int = 16, k: int = 16,
                  prompt: str | None = None, qformer_question: bool = False) -> dict:
    results = {**backend.describe(), "data": repr(data), "tasks": {}}
    for task in tasks:
        kind = "vqa" if task == "vqa" else "caption"
        indices = [i for i, e in enumerate(data.examples) if e.kind == kind][:n]
        if not indices:
            raise ValueError(f"--task {task} needs {'VQA rows' if kind == 'vqa' else 'captioned images'}; "
                             f"{data.source} has none ({data.describe()})")
        t0 = time.perf_counter()
        if task == "caption":
            r = caption_task(backend, data, indices, batch_size, prompt)
        elif task == "vqa":
            r = vqa_task(backend, data, indices, batch_size, qformer_question)
        else:
            r = retrieval_task(backend, data, indices, batch_size, k)
        results["tasks"][task] = {**r, "seconds": round(time.perf_counter() - t0, 3)}
    return results


def default_tasks(backend, data) -> list[str]:
    tasks = []
    if "caption" in data.kinds and "caption" in backend.capabilities:
        tasks.append("caption")
    if "caption" in data.kinds and {"itc", "itm"} <= backend.capabilities:
        tasks.append("retrieval")
    if "vqa" in data.kinds and "vqa" in backend.capabilities:
        tasks.append("vqa")
    return tasks


def format_results(results: dict) -> str:
    lines = [f"{results.get('backend')} {results.get('folder')} on {results['data']}"]
    for task, r in results["tasks"].items():
        if task == "caption":
            lines.append(f"caption   BLEU-4 {r['bleu4']:.3f}  CIDEr {r['cider']:.3f}  ({r['images']} images, "
                         f"prompt {r['prompt']!r}, {r['seconds']:.1f}s)")
        elif task == "vqa":
            lines.append(f"vqa       VQAv2 accuracy {r['vqa_accuracy']:.3f}  ({r['questions']} questions, "
                         f"{r['seconds']:.1f}s)")
        else:
            both = "  ".join(f"{w} R@{k} {r[f'{w}_r{k}']:.3f}" for w in ("i2t", "t2i") for k in (1, 5, 10))
            lines.append(f"retrieval {both}  (ITC top {r['k']} re-ranked by ITM; {r['images']} images, "
                         f"{r['texts']} texts, {r['seconds']:.1f}s)")
    return "\n".join(lines)


def run_on_data(args, backend, out) -> int:
    """`python -m train eval --data ...`: evaluate `backend` on a user's data set, print the table, write --out."""
    from train.training.datasets import open_dataset

    data = open_dataset(args.data, args.images)
    tasks = args.task or default_tasks(backend, data)
    if not tasks:
        raise EvaluationError(f"nothing to evaluate: {data!r}, and the model can do {sorted(backend.capabilities)}")
    try:
        results = evaluate_data(backend, data, tasks, n=args.n,
                                batch_size=args.batch_size, k=args.k, prompt=args.prompt,
                                qformer_question=args.qformer_question)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    print(format_results(results))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
