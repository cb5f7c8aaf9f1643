"""Captions from the Q-Former's own text decoder (ITG, multimodal causal mask), no LLM involved.

    captioner = ItgCaptioner(manifest, runners, encoder)
    captioner.generate(images, prompts, {"max_new_tokens": 16, "num_beams": 3})   # Q-Former token ids per image

The queries' keys/values are computed once per image (qformer_query); each generated token then costs one
text position of the qformer_itg graph. Rows start with [DEC] (and the prompt's words, if any).
"""
from runtime import search
from runtime.decoder import QFormerDecoder
from runtime.errors import PromptError
from runtime.text import QFormerTokenizer
from runtime.vision import chunks


class ItgCaptioner:
    def __init__(self, manifest, runners: dict, encoder):
        self.qformer, self.encoder = manifest.qformer, encoder
        self.max_batch, self.max_tokens = manifest.limits.max_batch, manifest.limits.max_qformer_tokens
        self.tokenizer = QFormerTokenizer.from_manifest(manifest)
        self.decoder = QFormerDecoder(runners["qformer_itg"], manifest.qformer, manifest.model.num_query_tokens)

    def config(self, generation: dict, prompt_tokens: int) -> search.GenerationConfig:
        room = self.max_tokens - prompt_tokens
        cfg = search.config_from_options(generation, self.qformer.sep_token_id, self.qformer.pad_token_id, room)
        search.check_beams(cfg, self.max_batch)
        if cfg.max_new_tokens > room:
            raise PromptError(f"max_new_tokens={cfg.max_new_tokens} does not fit: the Q-Former takes "
                              f"{self.max_tokens} text tokens (manifest limits.max_qformer_tokens) and the "
                              f"prompt uses {prompt_tokens}; ask for at most {room}")
        return cfg

    def prefill(self, pixel_values, ids, mask):
        """Queries once per image, then the prefill of the [DEC] (+ prompt) rows: first-step logits [B, V]."""
        return self.decoder.prefill(ids, mask, self.encoder.queries(self.encoder.embed(pixel_values)))

    def generate(self, images: list, prompts: list, generation: dict) -> list[list[int]]:
        ids, mask = self.tokenizer.encode_prompts(prompts)  # checks every prompt first
        cfg = self.config(generation, ids.shape[1])
        pixel_values = self.encoder.pixels(images)
        out = []
        for part in chunks(len(images), max(1, self.max_batch // cfg.num_beams)):
            logits = self.prefill(pixel_values[part], ids[part], mask[part])
            out += search.generate(self.decoder, logits, ids[part], cfg, prompt_mask=mask[part])
        return out

    def score(self, images: list, prompts: list, tokens: list[list[int]]) -> list:
        """Teacher forcing (see `runtime.llm.LlmGenerator.score`)."""
        ids, mask = self.tokenizer.encode_prompts(prompts)
        self.config({"max_new_tokens": max(1, max((len(t) for t in tokens), default=1))}, ids.shape[1])
        pixel_values = self.encoder.pixels(images)
        out = []
        for part in chunks(len(images), self.max_batch):
            logits = self.prefill(pixel_values[part], ids[part], mask[part])
            out += search.teacher_forced(self.decoder, logits, tokens[part], self.qformer.pad_token_id)
        return out
