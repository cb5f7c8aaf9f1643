"""Hugging Face's BLIP-2, called the way its users call it: the reference of the exporter's parity gate,
of PyTorch evaluation (`python -m train eval --model`) and of the benchmarks.

    from train.blip2.reference import HfReference
    ref = HfReference(checkpoint)                       # a train.blip2.checkpoint.Checkpoint
    ref.generate(images)                                # captions: generate(pixel_values=...), no input ids
    ref.generate(images, ["Question: what is it? Answer:", ...], num_beams=3)   # through Blip2Processor
    ref.generate(images, prompts, force={2: token_id})  # ... with the token at step 2 forced (a logits processor)
    ref.generate(images, force={0: [7, 9]})             # ... per row
    ref.teacher_forced(images, generated)               # the logits of one forward pass over generated tokens
    ref.itm(images, texts), ref.itc(images, texts)      # Blip2ForImageTextRetrieval
    ref.pixel_values(images)                            # the checkpoint's image processor (PIL backend)

Nothing here uses blip2-edge's own prompt layout or preprocessing, so the gate cannot share a mistake with
the runtime it checks: captions come from `Blip2ForConditionalGeneration.generate(pixel_values=...)` given no
input ids (it builds the placeholders and `text_config.bos_token_id` itself), prompts from the input ids
`Blip2Processor(images=..., text=prompts, padding=True)` lays out (left padding, as Hugging Face asks for
batched generation), Q-Former texts from the Q-Former's tokenizer, ITC/ITM from
`Blip2ForImageTextRetrieval(..., use_image_text_matching_head=...)`.
"""
from dataclasses import dataclass

import torch

from train.blip2.families import family


@dataclass
class Generated:
    tokens: list[list[int]]  # new token ids per row, up to and including EOS
    logits: list[torch.Tensor] | None = None  # per row [steps, V]: the raw logits of each step (output_logits)
    # the language model's input ids and attention mask as generate() laid them out (placeholders included): what
    # `teacher_forced` feeds again; None when the rows went through more than one generate call
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None


class _Force:
    """A logits processor that makes step t (0: the first new token) choose `force[t]`: one id for every row, or a
    list of one per row (None: that row chooses freely); generate calls it once per step."""

    def __init__(self, force: dict[int, int | list]):
        self.force, self.step = force, 0

    def __call__(self, input_ids, scores):
        tokens = self.force.get(self.step)
        self.step += 1
        if tokens is None:
            return scores
        tokens = tokens if isinstance(tokens, list) else [tokens] * scores.shape[0]
        forced = scores.clone()
        for row, token in enumerate(tokens):
            if token is not None:
                forced[row] = float("-inf")
                forced[row, token] = 0.0
        return forced


class HfReference:
    """`model`: the Hugging Face model to call (default: the checkpoint's, eager attention), e.g. one loaded with
    attn_implementation="sdpa" for a benchmark."""

    def __init__(self, checkpoint, model=None):
        from transformers import Blip2Processor
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        self.ck, cfg = checkpoint, checkpoint.config
        self.model = model if model is not None else checkpoint.hf
        # the PIL image processor (what transformers falls back to without torchvision, and what the runtime
        # reproduces), from the checkpoint's own settings
        self.image_processor = BlipImageProcessorPil.from_pretrained(checkpoint.path)
        self.processor = None
        if checkpoint.tokenizer is not None:
            # batched generation: a decoder-only LLM's prompts are padded on the left, as Hugging Face asks; an
            # encoder's keep the T5 tokenizer's right padding
            checkpoint.tokenizer.padding_side = family(cfg).padding
            self.processor = Blip2Processor(image_processor=self.image_processor, tokenizer=checkpoint.tokenizer,
                                            num_query_tokens=cfg.num_query_tokens)

    def pixel_values(self, images) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def _generate(self, images, prompts, force, output_logits: bool, options: dict) -> Generated:
        """One `generate` call for rows that are all captions (prompts None) or all prompted."""
        if prompts is None:
            inputs = {"pixel_values": self.pixel_values(images)}
        else:
            inputs = dict(self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True))
        if output_logits and options.get("num_beams", 1) > 1:
            raise ValueError("output_logits follows greedy rows; beam search reorders them")
        laid_out = []  # the first ids the LLM embeds: the prompt generate() built (later calls embed new tokens)
        hook = self.model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: laid_out.append(args[0]) if not laid_out else None)
        try:
            out = self.model.generate(**inputs, do_sample=False, return_dict_in_generate=True, output_logits=True,
                                      **options, **({"logits_processor": [_Force(force)]} if force else {}))
        finally:
            hook.remove()
        steps = len(out.logits)  # the new tokens are the last `steps` of every sequence
        tokens = [_until_eos(row[-steps:].tolist(), self.ck.config.text_config.eos_token_id) for row in out.sequences]
        logits = [torch.stack([s[b] for s in out.logits])[: len(t)] for b, t in enumerate(tokens)]
        ids = laid_out[0]
        return Generated(tokens, logits if output_logits else None,
                         (ids, inputs.get("attention_mask", torch.ones_like(ids))))

    @torch.no_grad()
    def teacher_forced(self, images, generated: Generated) -> list[torch.Tensor]:
        """Per row [tokens, V]: the logits Hugging Face's forward pass gives each of `generated`'s tokens when fed
        the ones before it (one pass, no cache; the steps of a generate call computed at once). Not for tokens
        equal to the image placeholder id: the forward pass puts image features at every placeholder."""
        if generated.inputs is None:
            raise ValueError("teacher_forced needs the rows of one generate call (all captions or all prompted)")
        cfg, (ids, mask) = self.ck.config, generated.inputs
        n = max(len(t) for t in generated.tokens)
        pad = cfg.text_config.pad_token_id
        new = torch.tensor([t + [pad] * (n - len(t)) for t in generated.tokens], dtype=torch.long)
        pixels = self.pixel_values(images)
        if cfg.use_decoder_only_language_model:  # the prompt, then every new token but the last
            full, ones = torch.cat([ids, new[:, :-1]], 1), torch.ones(len(new), n - 1, dtype=mask.dtype)
            logits = self.model(pixel_values=pixels, input_ids=full, attention_mask=torch.cat([mask, ones], 1)).logits
            logits = logits[:, -n:]
        else:  # the encoder reads the prompt, the decoder starts from decoder_start_token_id
            start = torch.full((len(new), 1), cfg.text_config.decoder_start_token_id, dtype=torch.long)
            logits = self.model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                decoder_input_ids=torch.cat([start, new[:, :-1]], 1)).logits
        return [logits[b, :len(t)] for b, t in enumerate(generated.tokens)]

    def generate(self, images, prompts=None, force: dict[int, int | list] | None = None, output_logits: bool = False,
                 **options) -> Generated:
        """Greedy or beam search (`options` as for Hugging Face generate: max_new_tokens, num_beams, ...) for
        each image, with its prompt (None: a caption). Rows with and without a prompt go through separate
        calls, as a user would make them; the result keeps the order of `images`."""
        images = list(images)
        prompts = [None] * len(images) if prompts is None else list(prompts)
        out = Generated([None] * len(images), [None] * len(images) if output_logits else None)
        parts = 0
        for captions in (True, False):
            rows = [i for i, p in enumerate(prompts) if (p is None) == captions]
            if not rows:
                continue
            part_force = force and {t: [tokens[i] for i in rows] if isinstance(tokens, list) else tokens
                                    for t, tokens in force.items()}  # (per-row forcing: this call's rows)
            part = self._generate([images[i] for i in rows], None if captions else [prompts[i] for i in rows],
                                  part_force, output_logits, options)
            parts, out.inputs = parts + 1, part.inputs if not parts else None
            for j, i in enumerate(rows):
                out.tokens[i] = part.tokens[j]
                if output_logits:
                    out.logits[i] = part.logits[j]
        return out

    # ------------------------------------------------------------ the Q-Former's text side
    def _retrieval_model(self):
        return self.ck.hf if self.ck.model.edge.stage == 1 else self.ck.model.hf_model(stage=1)

    def qformer_tokens(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.ck.qformer_tokenizer(list(texts), padding=True, truncation=True,
                                        max_length=self.ck.model.edge.max_text_tokens, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def itc(self, images, texts) -> torch.Tensor:
        """[I, T] ITC similarity: the largest cosine between a text's [CLS] feature and an image's queries."""
        ids, mask = self.qformer_tokens(texts)
        out = self._retrieval_model()(pixel_values=self.pixel_values(images), input_ids=ids, attention_mask=mask,
                                      use_image_text_matching_head=False)
        return out.logits_per_image

    @torch.no_grad()
    def itm(self, images, texts) -> torch.Tensor:
        """[N] probability that image i matches text i."""
        ids, mask = self.qformer_tokens(texts)
        out = self._retrieval_model()(pixel_values=self.pixel_values(images), input_ids=ids, attention_mask=mask,
                                      use_image_text_matching_head=True)
        return out.logits_per_image.softmax(-1)[:, 1]


@torch.no_grad()
def itg_greedy(model, image_embeds: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy Q-Former (ITG) captions from `train.blip2.model.Blip2Edge`, the whole sequence through the causal mask
    at every step (no KV cache): Hugging Face has no ITG, and this path is the one training takes."""
    e = model.edge
    out = []
    for row in image_embeds.split(1):
        ids = torch.tensor([[e.dec_token_id]])
        new = []
        for _ in range(max_new_tokens):
            token = int(model.itg_logits(row, ids, torch.ones_like(ids))[:, -1].argmax(-1))
            new.append(token)
            if token == e.sep_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
        out.append(new)
    return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
