"""End-to-end parity: the runtime pipeline against PyTorch, capability by capability.

    from export.e2e import hf_generate_ids, token_agreement
    ref = hf_generate_ids(checkpoint, images, prompts, max_new_tokens=20, num_beams=1)
    got = pipeline.generate_ids(images, prompts, max_new_tokens=20, num_beams=1)
    token_agreement(got, ref)      # 1.0 when every token of every row matches

LLM captions are compared with `Blip2ForConditionalGeneration.generate`, using
Hugging Face's own image processor and tokenizer; only the prompt layout (image
placeholders, then BOS + prompt, left-padded) is built here, as `Blip2Processor`
does it. The Q-Former capabilities (ITC similarities and rankings, ITM
probabilities, ITG captions) are compared with `train.model.Blip2Edge`, whose
ITG reference runs the whole sequence through the causal mask at every step
(no KV cache), so it checks the cached graph independently.
"""
import numpy as np
import torch
from PIL import Image


def hf_pixel_values(checkpoint, images) -> torch.Tensor:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    keys = ("size", "resample", "image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale",
            "do_normalize", "do_convert_rgb")
    processor = BlipImageProcessorPil(**{k: v for k, v in checkpoint.image_processor.items() if k in keys})
    return processor(images=images, return_tensors="pt")["pixel_values"]


def hf_generate_ids(checkpoint, images, prompts, **generation) -> list[list[int]]:
    """New token ids per row from HF generate (EOS kept, padding after EOS dropped)."""
    cfg = checkpoint.config
    tok = checkpoint.tokenizer
    rows = [[cfg.image_token_index] * cfg.num_query_tokens + tok(p or "").input_ids for p in prompts]
    width = max(len(r) for r in rows)
    pad = cfg.text_config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = checkpoint.hf.generate(
            pixel_values=hf_pixel_values(checkpoint, images), input_ids=ids, attention_mask=mask, do_sample=False,
            eos_token_id=cfg.text_config.eos_token_id, pad_token_id=pad, **generation,
        )
    return [_strip(row[width:].tolist(), cfg.text_config.eos_token_id) for row in out]


def _strip(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def token_agreement(got: list[list[int]], ref: list[list[int]]) -> float:
    """Fraction of reference positions (over all rows) where the tokens agree; length differences count as misses."""
    total = sum(max(len(g), len(r)) for g, r in zip(got, ref))
    same = sum(sum(a == b for a, b in zip(g, r)) for g, r in zip(got, ref))
    return same / total if total else 1.0


def probe_images(size: int, count: int = 4, seed: int = 0) -> list[Image.Image]:
    """Deterministic test images: coloured shapes on noisy backgrounds, at the model's input size x 1.5."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    side = max(16, int(size * 1.5))
    images = []
    for _ in range(count):
        base = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        x0, y0 = rng.integers(0, side // 2, size=2)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse([int(x0), int(y0), int(x0) + side // 2, int(y0) + side // 2], fill=color)
        images.append(im)
    return images


E2E_TEXTS = ["a red circle on the left", "a photo", "there is a small blue square at the top of the image",
             "two shapes, a green triangle above an orange circle"]


def llm_end_to_end(ck, pipe, limits, required: dict, images: list | None = None) -> dict:
    """Greedy captions and prompted answers: runtime pipeline vs HF generate (on 4 images)."""
    images = _four(images) or probe_images(ck.config.vision_config.image_size, count=4)
    new = min(20, limits.max_new_tokens)
    cases = {
        "caption": [None] * len(images),
        "prompted": ["a photo of", "Question: what color is the circle? Answer:", "a", "there is"],
    }
    report = {}
    for case, prompts in cases.items():
        ref = hf_generate_ids(ck, images, prompts, max_new_tokens=new)
        if required["teacher_forced"]:
            agreement = token_agreement(llm_teacher_forced(pipe, images, prompts, ref), ref)
        else:
            agreement = token_agreement(pipe.generate_ids(images, prompt=prompts, max_new_tokens=new), ref)
        report[case] = {"token_agreement": agreement, "rows": len(images), "max_new_tokens": new,
                        "teacher_forced": required["teacher_forced"],
                        "reference": "Blip2ForConditionalGeneration.generate (greedy)",
                        "passed": agreement >= required["token_agreement"],
                        "summary": f"{_agreement_kind(required)} token agreement {agreement:.3f}"}
    return report


def _four(images: list | None) -> list | None:
    """Four PIL images (the prompt and text lists here have four entries), from paths or images."""
    if not images:
        return None
    return [Image.open(i).convert("RGB") if not isinstance(i, Image.Image) else i for i in images[:4]]


def _agreement_kind(required: dict) -> str:
    return "teacher-forced" if required["teacher_forced"] else "greedy"


def teacher_forced_tokens(decoder, logits: np.ndarray, ref: list[list[int]], pad: int,
                          banned: tuple[int, ...] = ()) -> list[list[int]]:
    """The runtime's top choice at every reference position when every step is fed the reference's previous
    tokens (a `runtime.decoder` after its prefill; `logits` are the prefill's). `banned` ids are never chosen
    (EOS when the reference was generated with min_new_tokens)."""
    width = max((len(r) for r in ref), default=0)
    picks = [[] for _ in ref]
    for t in range(width):
        if banned:
            logits = logits.copy()
            logits[:, list(banned)] = -np.inf
        top = logits.argmax(-1)
        for b, row in enumerate(ref):
            if t < len(row):
                picks[b].append(int(top[b]))
        if t + 1 < width:
            logits = decoder.step(np.array([row[t] if t < len(row) else pad for row in ref], dtype=np.int64))
    return picks


def llm_teacher_forced(pipe, images, prompts, ref: list[list[int]], banned: tuple[int, ...] = ()) -> list[list[int]]:
    """`teacher_forced_tokens` of the pipeline's LLM after its prefill of `images` and `prompts`."""
    logits, _ = pipe._prefill_llm(pipe.image_prompts(images), [pipe._prompt_ids(p) for p in prompts])
    return teacher_forced_tokens(pipe.decoder, logits, ref, pipe.pad_token_id, banned)


def teacher_forced_agreement(decoder, logits: np.ndarray, ref: list[list[int]], pad: int,
                             banned: tuple[int, ...] = ()) -> float:
    """Fraction of reference tokens that are the runtime's top choice given the reference's previous tokens."""
    return token_agreement(teacher_forced_tokens(decoder, logits, ref, pad, banned), ref)


def qformer_texts(ck, texts: list[str], first_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Former token ids and mask as the HF tokenizer makes them ([CLS] text [SEP], right-padded)."""
    enc = ck.qformer_tokenizer(texts, padding=True, truncation=True, max_length=ck.model.edge.max_text_tokens,
                               return_tensors="pt")
    ids = enc.input_ids.clone()
    if first_id is not None:
        ids[:, 0] = first_id
    return ids, enc.attention_mask


@torch.no_grad()
def torch_itg_greedy(model, image_embeds: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy Q-Former captions, the whole sequence through the causal mask at every step (no cache)."""
    e = model.edge
    out = []
    for row in image_embeds.split(1):
        ids = torch.tensor([[e.dec_token_id]])
        new = []
        for _ in range(max_new_tokens):
            logits = model.itg_logits(row, ids, torch.ones_like(ids))[:, -1]
            token = int(logits.argmax(-1))
            new.append(token)
            if token == e.sep_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
        out.append(new)
    return out


def same_ranking(got: np.ndarray, ref: np.ndarray, tie: float) -> bool:
    """True when, in every row, ranking by `got` ranks by `ref` too; reference scores closer than `tie`
    are ties (their order is numerical noise, not a different ranking)."""
    for g, r in zip(got, ref):
        ranked = r[np.argsort(-g, kind="stable")]
        if (np.diff(ranked) > tie).any():
            return False
    return True


@torch.no_grad()
def qformer_end_to_end(ck, pipe, limits, required: dict, images: list | None = None) -> dict:
    """ITC similarities and rankings, ITM probabilities, ITG greedy captions: runtime vs Blip2Edge."""
    model = ck.model
    images = _four(images) or probe_images(ck.config.vision_config.image_size, count=4, seed=5)
    image_embeds = model.encode_image(hf_pixel_values(ck, images))
    report = {}
    if "image_feats" in pipe.runners["qformer_query"].output_names and "qformer_text" in pipe.runners:
        ids, mask = qformer_texts(ck, E2E_TEXTS)
        query_output, _ = model.query_forward(image_embeds)
        ref = torch.einsum("iqd,td->iqt", model.image_feats(query_output), model.text_feat(ids, mask)).amax(1).numpy()
        got = pipe.similarity(pipe.embed_images(images), pipe.embed_texts(E2E_TEXTS))
        err = float(np.abs(got - ref).max())
        same = same_ranking(got, ref, required["sim_atol"]) and same_ranking(got.T, ref.T, required["sim_atol"])
        report["itc"] = {"max_abs": err, "same_ranking": same, "reference": "Blip2Edge image_feats/text_feat",
                         "passed": err <= required["sim_atol"] and (same or not required["same_ranking"]),
                         "summary": f"similarity max abs err {err:.2g}, rankings {'identical' if same else 'DIFFER'}"}
    if "qformer_itm" in pipe.runners:
        ids, mask = qformer_texts(ck, E2E_TEXTS)
        logits, _ = model.itm_forward(image_embeds, ids, mask)
        ref = logits.softmax(-1)[:, 1].numpy()
        got = pipe.itm(images, E2E_TEXTS)
        err = float(np.abs(got - ref).max())
        report["itm"] = {"max_abs": err, "reference": "Blip2Edge itm_forward", "passed": err <= required["prob_atol"],
                         "summary": f"match probability max abs err {err:.2g}"}
    if "qformer_itg" in pipe.runners:
        new = min(16, limits.max_qformer_tokens - 1)
        ref = torch_itg_greedy(model, image_embeds, new)
        if required["teacher_forced"]:
            ids, mask = pipe.qtokenizer.encode_prompts([None] * len(images))
            logits = pipe._prefill_qformer(pipe.image_config(images), ids, mask)
            agreement = teacher_forced_agreement(pipe.itg, logits, ref, pipe.manifest["qformer"]["pad_token_id"])
        else:
            agreement = token_agreement(pipe.generate_ids(images, decoder="qformer", max_new_tokens=new), ref)
        report["itg_caption"] = {"token_agreement": agreement, "rows": len(images), "max_new_tokens": new,
                                 "teacher_forced": required["teacher_forced"],
                                 "reference": "Blip2Edge itg_logits, uncached greedy",
                                 "passed": agreement >= required["token_agreement"],
                                 "summary": f"{_agreement_kind(required)} token agreement {agreement:.3f}"}
    return report


def accuracy_report(fp32_folder, folder, images: list, backend: str = "onnxruntime", source: str | None = None) -> dict:
    """What a reduced-precision folder costs against the fp32 one, on held-out `images`: greedy
    (free-running) token agreement and identical outputs of LLM and Q-Former captions, and the largest
    change in ITC similarities and ITM probabilities."""
    from runtime import Blip2Pipeline

    ref_pipe = Blip2Pipeline.from_dir(fp32_folder, backend="onnxruntime")
    pipe = Blip2Pipeline.from_dir(folder, backend=backend)
    count = len(images)
    report, parts = {"images": count, "source": source}, []
    decoders = [d for d, graph in (("llm", "llm_decoder"), ("qformer", "qformer_itg")) if graph in pipe.runners]
    for decoder in decoders:
        new = min(20, pipe.max_new_tokens) if decoder == "llm" else min(16, pipe.manifest["qformer"]["max_text_tokens"] - 1)
        ref = ref_pipe.generate_ids(images, decoder=decoder, max_new_tokens=new)
        got = pipe.generate_ids(images, decoder=decoder, max_new_tokens=new)
        agree, same = token_agreement(got, ref), sum(g == r for g, r in zip(got, ref)) / len(ref)
        report[f"{decoder}_caption"] = {"token_agreement": agree, "identical_captions": same, "max_new_tokens": new}
        parts.append(f"{decoder} captions: greedy token agreement {agree:.3f}, identical {same:.2f}")
    if "qformer_text" in pipe.runners:
        sims = [p.similarity(p.embed_images(images), p.embed_texts(E2E_TEXTS)) for p in (ref_pipe, pipe)]
        top1 = float((sims[0].argmax(1) == sims[1].argmax(1)).mean())
        report["itc"] = {"max_abs": float(np.abs(sims[0] - sims[1]).max()), "same_top1_text": top1}
        parts.append(f"ITC similarity max abs diff {report['itc']['max_abs']:.2g}")
    if "qformer_itm" in pipe.runners:
        probs = [p.itm(images, [E2E_TEXTS[i % len(E2E_TEXTS)] for i in range(count)]) for p in (ref_pipe, pipe)]
        report["itm"] = {"max_abs": float(np.abs(probs[0] - probs[1]).max())}
        parts.append(f"ITM probability max abs diff {report['itm']['max_abs']:.2g}")
    report["summary"] = "; ".join(parts) + f" ({count} held-out images)"
    return report
