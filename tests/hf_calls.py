"""Hugging Face called the way its users call it, written out for the tests: the reference the runtime is
checked against. Nothing here comes from the toolkit (a helper shared with the code under test would hide
a shared mistake)."""
import torch
from transformers import Blip2Processor, LogitsProcessor
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil


def hf_pixel_values(ck, images) -> torch.Tensor:
    """Pixels as the checkpoint's image processor makes them (the PIL backend, what transformers uses
    without torchvision)."""
    return BlipImageProcessorPil.from_pretrained(ck.path)(images=list(images), return_tensors="pt")["pixel_values"]


def qformer_texts(ck, texts):
    """[CLS] text [SEP], right-padded, by the checkpoint's own Q-Former tokenizer."""
    enc = ck.qformer_tokenizer(list(texts), padding=True, truncation=True, max_length=ck.model.edge.max_text_tokens,
                               return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def processor(ck) -> Blip2Processor:
    p = Blip2Processor.from_pretrained(ck.path)
    if ck.config.use_decoder_only_language_model:
        p.tokenizer.padding_side = "left"  # what Hugging Face asks for batched generation with OPT
    return p  # (T5: its tokenizer's own right padding)


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


@torch.no_grad()
def hf_generate(ck, images, prompts, with_logits: bool = False, **options):
    """New token ids per row: captions (prompts None) with pixel values only, prompts through the checkpoint's
    Blip2Processor; EOS kept, what follows it dropped. With `with_logits`, (token ids, per row the logits
    [tokens, vocabulary] generate() chose each of them from)."""
    if with_logits:
        options.update(output_logits=True, return_dict_in_generate=True)
    if prompts is None:
        out = ck.hf.generate(pixel_values=hf_pixel_values(ck, images), **options)
        start = ck.config.num_query_tokens + 1  # generate() put the placeholders and BOS first
    else:
        inputs = processor(ck)(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
        out = ck.hf.generate(**inputs, **options)
        start = inputs["input_ids"].shape[1]
    if not ck.config.use_decoder_only_language_model:
        start = 1  # an encoder-decoder returns the decoder's tokens, after decoder_start_token_id
    sequences = out.sequences if with_logits else out
    tokens = until_eos([row[start:].tolist() for row in sequences], ck.config.text_config.eos_token_id)
    if not with_logits:
        return tokens
    steps = torch.stack(out.logits, dim=1).float().numpy()  # [rows, steps, vocabulary]
    return tokens, [steps[i, :len(t)] for i, t in enumerate(tokens)]


def hf_rows(ck, images, prompts, **options) -> list[list[int]]:
    """hf_generate for a mixed list of prompts (None: caption): captions and prompted rows in separate calls."""
    out = [None] * len(images)
    for captions in (True, False):
        idx = [i for i, p in enumerate(prompts) if (p is None) == captions]
        if idx:
            rows = hf_generate(ck, [images[i] for i in idx], None if captions else [prompts[i] for i in idx],
                               **options)
            for i, r in zip(idx, rows):
                out[i] = r
    return out


class ForceAt(LogitsProcessor):
    """Make generation step `step` (0 = the first new token) choose `token`."""

    def __init__(self, step: int, token: int):
        self.step, self.token, self.calls = step, token, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls - 1 == self.step:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0
        return scores
