"""End-to-end parity: the runtime pipeline's generated tokens against `Blip2ForConditionalGeneration.generate`.

    from export.e2e import hf_generate_ids, token_agreement
    ref = hf_generate_ids(checkpoint, images, prompts, max_new_tokens=20, num_beams=1)
    got = pipeline.generate_ids(images, prompts, max_new_tokens=20, num_beams=1)
    token_agreement(got, ref)      # 1.0 when every token of every row matches

The reference uses Hugging Face's own image processor, tokenizer and generate;
only the prompt layout (image placeholders, then BOS + prompt, left-padded) is
built here, as `Blip2Processor` does it.
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
        out = checkpoint.model.generate(
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
