"""What a reduced-precision folder costs against the fp32 one: the accuracy report in parity.json.

    from export.accuracy import accuracy_report
    report = accuracy_report("engines/.../fp32", "engines/.../onnx-int8", held_out_images)

On held-out images: greedy (free-running) token agreement and identical outputs of LLM and Q-Former captions,
the largest change in ITC similarities and ITM probabilities. The gate (export.parity) decides whether the
folder is written; this report says what the precision costs, for the engineer choosing one.
"""
import numpy as np

from export.parity import GATE_TEXTS, token_agreement


def _captions(ref_pipe, pipe, images, decoder: str, new: int) -> dict:
    ref = ref_pipe.generate_ids(images, decoder=decoder, max_new_tokens=new)
    got = pipe.generate_ids(images, decoder=decoder, max_new_tokens=new)
    return {"token_agreement": token_agreement(got, ref),
            "identical_captions": sum(g == r for g, r in zip(got, ref)) / len(ref), "max_new_tokens": new}


def accuracy_report(ref_pipe, pipe, images: list, source: str | None = None) -> dict:
    """`pipe` (the reduced folder's pipeline) against `ref_pipe` (the fp32 folder's) on `images`."""
    count = len(images)
    report, parts = {"images": count, "source": source}, []
    if pipe.llm is not None:
        report["llm_caption"] = _captions(ref_pipe, pipe, images, "llm", min(20, pipe.manifest.limits.max_new_tokens))
    if pipe.itg is not None:
        report["qformer_caption"] = _captions(ref_pipe, pipe, images, "qformer",
                                              min(16, pipe.manifest.limits.max_qformer_tokens - 1))
    for key in ("llm_caption", "qformer_caption"):
        if key in report:
            parts.append(f"{key.split('_')[0]} captions: greedy token agreement {report[key]['token_agreement']:.3f}, "
                         f"identical {report[key]['identical_captions']:.2f}")
    if "qformer_text" in pipe.runners:
        sims = [p.similarity(p.embed_images(images), p.embed_texts(GATE_TEXTS)) for p in (ref_pipe, pipe)]
        report["itc"] = {"max_abs": float(np.abs(sims[0] - sims[1]).max()),
                         "same_top1_text": float((sims[0].argmax(1) == sims[1].argmax(1)).mean())}
        parts.append(f"ITC similarity max abs diff {report['itc']['max_abs']:.2g}")
    if "qformer_itm" in pipe.runners:
        texts = [GATE_TEXTS[i % len(GATE_TEXTS)] for i in range(count)]
        probs = [p.itm(images, texts) for p in (ref_pipe, pipe)]
        report["itm"] = {"max_abs": float(np.abs(probs[0] - probs[1]).max())}
        parts.append(f"ITM probability max abs diff {report['itm']['max_abs']:.2g}")
    report["summary"] = "; ".join(parts) + f" ({count} held-out images)"
    return report
