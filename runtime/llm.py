"""Text from the LLM: prompts laid out around the soft prompt, prefill, search, teacher-forced scoring.

    gen = LlmGenerator(manifest, runners, encoder, questions)    # what Blip2Pipeline.generate uses
    gen.generate(images, prompts, {"max_new_tokens": 20, "num_beams": 3})   # new token ids per image
    gen.score(images, prompts, tokens)                           # logits that predicted each of `tokens`

The rows follow `runtime.prompt.PromptLayout` (what Hugging Face builds); every prompt is checked before any
graph runs. With `questions` (a `runtime.retrieval.QFormerText`), a text per image goes through the Q-Former
with the image (bi-directional graph), so the soft prompt depends on it (BLIP-2's question-aware queries).
"""
import numpy as np

from runtime import search
from runtime.decoder import DECODERS
from runtime.errors import PromptError
from runtime.manifest import rebuild_hint
from runtime.prompt import PromptLayout
from runtime.text import MAX_CHARS_PER_TOKEN, LlmTokenizer
from runtime.vision import chunks


class LlmGenerator:
    def __init__(self, manifest, runners: dict, encoder, questions=None):
        llm, self.limits = manifest.llm, manifest.limits
        self.llm, self.encoder, self.questions = llm, encoder, questions
        self.num_queries = manifest.model.num_query_tokens
        self.decoder = DECODERS[llm.family](runners, llm)
        self.layout = PromptLayout(self.num_queries, llm.image_token_id, llm.bos_token_id,
                                   tuple(llm.prompt_prefix_ids), llm.pad_token_id, tuple(llm.prompt_suffix_ids),
                                   self.decoder.padding)
        self.tokenizer = LlmTokenizer.from_manifest(manifest)
        self.build_command = rebuild_hint(manifest.folder, manifest.target)
        self.max_prompt_chars = self.limits.max_prompt_tokens * MAX_CHARS_PER_TOKEN

    # ------------------------------------------------------------ checks, before any graph runs
    def _rebuild(self, new_tokens: int | None = None, prompt_tokens: int | None = None) -> str:
        """How to get a folder that holds `new_tokens` new tokens or `prompt_tokens` prompt tokens (the other limit
        kept where the position table allows): a build command, or why no build can."""
        room = None if self.llm.max_positions is None else self.llm.max_positions - self.num_queries
        new = new_tokens or (self.limits.max_new_tokens if room is None else
                             min(self.limits.max_new_tokens, room - prompt_tokens))
        prompt = prompt_tokens or (self.limits.max_prompt_tokens if room is None else
                                   min(self.limits.max_prompt_tokens, room - new))
        if new < 1 or prompt < 1:
            return (f". No build can hold that: the LLM's position table has {self.llm.max_positions} positions, "
                    f"{self.num_queries} of them for the image, so prompt and new tokens together fit in {room}")
        return f", or rebuild with `{self.build_command} --max-new-tokens {new} --max-prompt-tokens {prompt}`"

    def rows(self, prompts: list) -> list[list[int]]:
        """The LLM's input ids for every prompt (None: caption; the decoder's for OPT, the encoder's for T5), each
        checked against the folder's limits."""
        rows = []
        for i, prompt in enumerate(prompts):
            what = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if prompt is not None and not isinstance(prompt, str):
                raise PromptError(f"{what} must be a string or None, got {type(prompt).__name__}")
            if prompt is not None and not prompt.strip():
                raise PromptError(f"{what} is empty; pass prompt=None (or call caption()) to caption without a "
                                  f"prompt")
            if prompt is not None and len(prompt) > self.max_prompt_chars:
                raise PromptError(f"{what} is {len(prompt)} characters long; the engine folder allows "
                                  f"{self.limits.max_prompt_tokens} tokens (manifest limits.max_prompt_tokens), at "
                                  f"most {self.max_prompt_chars} characters: shorten it")
            text = None if prompt is None else self.tokenizer.encode(prompt)
            if text is not None and self.layout.image_token_id in text:
                raise PromptError(f"{what} contains the image placeholder token (id {self.layout.image_token_id}, "
                                  f"e.g. '<image>'), which only the image's soft prompt may fill; remove it")
            length = self.layout.text_length(text)
            if length > self.limits.max_prompt_tokens:
                raise PromptError(
                    f"{what} is {length} tokens long, the engine folder allows {self.limits.max_prompt_tokens} "
                    f"(manifest limits.max_prompt_tokens); shorten it{self._rebuild(prompt_tokens=length)}")
            rows.append(self.layout.row(text))
        return rows

    def config(self, generation: dict) -> search.GenerationConfig:
        cfg = search.config_from_options(generation, self.llm.eos_token_id, self.llm.pad_token_id,
                                         self.limits.max_new_tokens)
        search.check_beams(cfg, self.limits.max_batch)
        if cfg.max_new_tokens > self.limits.max_new_tokens:
            raise PromptError(
                f"max_new_tokens={cfg.max_new_tokens} exceeds this engine folder's limit of "
                f"{self.limits.max_new_tokens} (manifest limits.max_new_tokens); ask for fewer"
                f"{self._rebuild(new_tokens=cfg.max_new_tokens)}")
        return cfg

    # ------------------------------------------------------------ running
    def soft_prompt(self, pixel_values: np.ndarray, questions: list[str] | None = None) -> np.ndarray:
        """[B, Nq, D]: the projected queries of each image (question-aware when `questions` are given)."""
        embeds = self.encoder.embed(pixel_values)
        if questions is None:
            return self.encoder.queries(embeds, ["llm_prompt"])["llm_prompt"]
        return self.questions.itm_outputs(embeds, questions)["llm_prompt"]

    def _prefill(self, soft_prompt: np.ndarray, rows: list[list[int]]) -> tuple[np.ndarray, tuple]:
        """Pad the rows (on the family's side) and run the prefill: (first-step logits [B, V], the ids and mask the
        repetition penalty sees)."""
        input_ids, attention_mask = self.layout.batch(rows)
        logits = self.decoder.prefill(input_ids, attention_mask, soft_prompt)
        return logits, self.decoder.context(input_ids, attention_mask)

    def _chunks(self, images: list, prompts: list, questions, per_image: int):
        """(soft prompt, rows, part) for max_batch // per_image images at a time; prompts are checked first."""
        rows = self.rows(prompts)
        pixel_values = self.encoder.pixels(images)
        for part in chunks(len(images), max(1, self.limits.max_batch // per_image)):
            soft_prompt = self.soft_prompt(pixel_values[part], questions[part] if questions else None)
            yield soft_prompt, rows[part], part

    def generate(self, images: list, prompts: list, generation: dict, questions=None) -> list[list[int]]:
        """New token ids per image (EOS included when generated)."""
        cfg = self.config(generation)
        out = []
        for soft_prompt, rows, _ in self._chunks(images, prompts, questions, cfg.num_beams):
            logits, (context, mask) = self._prefill(soft_prompt, rows)
            out += search.generate(self.decoder, logits, context, cfg, prompt_mask=mask)
        return out

    def score(self, images: list, prompts: list, tokens: list[list[int]], questions=None) -> list[np.ndarray]:
        """Teacher forcing: per image, float32 [len(tokens[i]), V], the logits that predicted each of its tokens
        when fed the prompt and the tokens before it."""
        longest = max((len(t) for t in tokens), default=0)
        self.config({"max_new_tokens": max(1, longest)})
        out = []
        for soft_prompt, rows, part in self._chunks(images, prompts, questions, 1):
            logits, _ = self._prefill(soft_prompt, rows)
            out += search.teacher_forced(self.decoder, logits, tokens[part], self.layout.pad_token_id)
        return out
