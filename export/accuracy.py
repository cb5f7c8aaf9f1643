"""What a reduced-precision folder costs against the fp32 one: the accuracy report in parity.json.

    from export.accuracy import accuracy_report, pipeline_outputs
    report = accuracy_report(pipeline_outputs(fp32_pipe, images), pipeline_outputs(int8_pipe, images), len(images))

On held-out images: greedy (free-running) token agreement and identical outputs of LLM and Q-Former captions,
the largest change in ITC similarities and ITM probabilities. The gate (export.parity) decides whether the
folder is written; this report says what the precision costs, for the engineer choosing one.
"""
import numpy as np

from export.parity import GATE_TEXTS, token_agreement


def pipeline_outputs(pipe, images: list, chunk: int = 4) -> dict:
    """What a folder's pipeline makes of `images`: greedy LLM and Q-Former captions, ITC similarities to the gate's
    texts, ITM probabilities (whichever the folder has). Plain data: the fp32 folder's are computed and its
    pipeline closed before the reduced folder's opens. Images go `chunk` at a time (every row is computed alone
    all the same): at batch 8 ONNX Runtime's buffers for the 677M blip2-opt-2.7b variant took 0.5 GB more than
    at 4, on top of the float32 graphs, and this is the build's largest step."""
    limits, out = pipe.manifest.limits, {"max_new_tokens": {}}
    parts = [images[i: i + chunk] for i in range(0, len(images), chunk)]
    if pipe.llm is not None:
        out["max_new_tokens"]["llm_caption"] = min(20, limits.max_new_tokens)
    if pipe.itg is not None:
        out["max_new_tokens"]["qformer_caption"] = min(16, limits.max_qformer_tokens - 1)
    for key, new in out["max_new_tokens"].items():
        out[key] = [row for part in parts for row in pipe.generate_ids(part, decoder=key.split("_")[0],
                                                                       max_new_tokens=new)]
    if "qformer_text" in pipe.runners:
        feats = np.concatenate([pipe.embed_images(part) for part in parts])
        out["itc"] = pipe.similarity(feats, pipe.embed_texts(GATE_TEXTS))
    if "qformer_itm" in pipe.runners:
        texts = [GATE_TEXTS[i % len(GATE_TEXTS)] for i in range(len(images))]
        out["itm"] = np.concatenate([pipe.itm(part, texts[i * chunk: (i + 1) * chunk]) for i, part in enumerate(parts)])
    return out


def accuracy_report(ref: dict, got: dict, count: int, source: str | None = None) -> dict:
    """The reduced folder's `pipeline_outputs` (`got`) against the fp32 folder's (`ref`) on `count` images."""
    report, parts = {"images": count, "source": source}, []
    for key in ("llm_caption", "qformer_caption"):
        if key in ref:
            report[key] = {"token_agreement": token_agreement(got[key], ref[key]),
                           "identical_captions": sum(g == r for g, r in zip(got[key], ref[key])) / len(ref[key]),
                           "max_new_tokens": ref["max_new_tokens"][key]}
            parts.append(f"{key.split('_')[0]} captions: greedy token agreement {report[key]['token_agreement']:.3f}, "
                         f"identical {report[key]['identical_captions']:.2f}")
    if "itc" in ref:
        report["itc"] = {"max_abs": float(np.abs(ref["itc"] - got["itc"]).max()),
                         "same_top1_text": float((ref["itc"].argmax(1) == got["itc"].argmax(1)).mean())}
        parts.append(f"ITC similarity max abs diff {report['itc']['max_abs']:.2g}")
    if "itm" in ref:
        report["itm"] = {"max_abs": float(np.abs(ref["itm"] - got["itm"]).max())}
        parts.append(f"ITM probability max abs diff {report['itm']['max_abs']:.2g}")
    report["summary"] = "; ".join(parts) + f" ({count} held-out images)"
    return report
