"""`Blip2Pipeline`: captioning and prompted generation over an engine folder, no torch involved.

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_dir("engines/demo/onnx")
    pipe.caption(["cat.jpg", "dog.png"], max_new_tokens=30, num_beams=3)
    pipe.generate(images, prompt="Question: what color is the circle? Answer:")
    pipe.generate(images, prompt=["a photo of", "Question: how many? Answer:"], do_sample=True, top_p=0.9, seed=0)

Images are paths, PIL images or uint8 HWC arrays. Rows of a batch may have
prompts of different lengths: they are left-padded, and a batch gives the same
tokens as captioning each image alone.
"""
from pathlib import Path

import numpy as np

from runtime import search
from runtime.decoder import LlmDecoder
from runtime.errors import BackendError, PromptError
from runtime.image import ImageProcessorConfig
from runtime.manifest import load_manifest
from runtime.runners import default_threads, make_runner
from runtime.text import PromptTokenizer


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Blip2Pipeline:
    def __init__(self, manifest, backend: str = "onnxruntime", threads: int | None = None):
        self.manifest = manifest
        self.backend = backend
        kwargs = {"threads": threads or default_threads()} if backend == "onnxruntime" else {}
        self.runners = {name: make_runner(manifest.graph_path(name), backend, **kwargs) for name in manifest.graphs}
        self.image_config = ImageProcessorConfig.from_dict(manifest["image"])
        self.tokenizer = PromptTokenizer.from_manifest(manifest)
        self.decoder = LlmDecoder(self.runners["llm_decoder"], manifest)
        gen = manifest["generation"]
        self.num_queries = manifest["model"]["num_query_tokens"]
        self.image_token_id = manifest["model"]["image_token_id"]
        self.eos_token_id, self.pad_token_id = gen["eos_token_id"], gen["pad_token_id"]
        self.max_prompt_tokens, self.max_new_tokens = gen["max_prompt_tokens"], gen["max_new_tokens"]
        self.max_batch = gen["max_batch"]

    @classmethod
    def from_dir(cls, folder, backend: str = "auto", threads: int | None = None) -> "Blip2Pipeline":
        """Open an engine folder written by `python -m export.build`.

        backend: "onnxruntime", "tensorrt", or "auto" (TensorRT for a TensorRT engine folder, else ONNX Runtime).
        """
        manifest = load_manifest(folder)
        if backend == "auto":
            backend = "tensorrt" if manifest["target"].startswith("trt") else "onnxruntime"
        if backend == "tensorrt" and not manifest["target"].startswith("trt"):
            raise BackendError(
                f"{folder} holds ONNX graphs (target {manifest['target']}); use backend='onnxruntime', or build "
                f"TensorRT engines with `python -m export.build --target trt-fp16`"
            )
        return cls(manifest, backend, threads)

    # ------------------------------------------------------------------ public API
    def caption(self, images, max_new_tokens: int = 30, num_beams: int = 1, **generation) -> list[str]:
        """One caption per image (no text prompt)."""
        return self.generate(images, prompt=None, max_new_tokens=max_new_tokens, num_beams=num_beams, **generation)

    def generate(self, images, prompt=None, **generation) -> list[str]:
        """Generate text for each image, optionally after a prompt (one string, or one per image).

        generation: max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_k, top_p,
        repetition_penalty, length_penalty, early_stopping, seed (see runtime.search.GenerationConfig).
        """
        return [self.tokenizer.decode(ids) for ids in self.generate_ids(images, prompt, **generation)]

    def generate_ids(self, images, prompt=None, **generation) -> list[list[int]]:
        """Like `generate`, but returns the new token ids of each row (EOS included if produced)."""
        cfg = self._generation_config(generation)
        images = _as_list(images)
        prompts = self._prompts(prompt, len(images))
        rows = [self._prompt_ids(p) for p in prompts]  # validate every prompt before running anything
        pixel_values = self.image_config(images)
        chunk = max(1, self.max_batch // cfg.num_beams)
        out = []
        for start in range(0, len(images), chunk):
            out += self._generate_chunk(pixel_values[start:start + chunk], rows[start:start + chunk], cfg)
        return out

    def image_prompts(self, images) -> np.ndarray:
        """The LLM soft prompt of each image: [B, num_query_tokens, llm_hidden]."""
        return self._soft_prompt(self.image_config(_as_list(images)))

    # ------------------------------------------------------------------ steps
    def _soft_prompt(self, pixel_values: np.ndarray) -> np.ndarray:
        image_embeds = self.runners["vision"].run({"pixel_values": pixel_values})["image_embeds"]
        return self.runners["qformer_query"].run({"image_embeds": image_embeds})["llm_prompt"]

    def _generate_chunk(self, pixel_values, rows, cfg) -> list[list[int]]:
        soft_prompt = self._soft_prompt(pixel_values)
        input_ids, attention_mask = self._left_pad(rows)
        logits = self.decoder.prefill(input_ids, attention_mask, soft_prompt)
        return search.generate(self.decoder, logits, input_ids, cfg)

    def _left_pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        return ids, mask

    # ------------------------------------------------------------------ input checks
    def _generation_config(self, generation: dict) -> search.GenerationConfig:
        known = set(search.GenerationConfig.__dataclass_fields__) - {"eos_token_id", "pad_token_id"}
        unknown = sorted(set(generation) - known)
        if unknown:
            raise PromptError(f"unknown generation option(s) {unknown}; valid options are {sorted(known)}")
        cfg = search.GenerationConfig(eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, **generation)
        cfg.validate()
        if cfg.max_new_tokens > self.max_new_tokens:
            raise PromptError(
                f"max_new_tokens={cfg.max_new_tokens} exceeds this engine folder's limit of {self.max_new_tokens} "
                f"(manifest generation.max_new_tokens); ask for fewer, or rebuild with "
                f"`python -m export.build ... --max-new-tokens {cfg.max_new_tokens}`"
            )
        return cfg

    def _prompts(self, prompt, batch: int) -> list:
        if batch == 0:
            raise PromptError("no images given; pass one image or a list of images")
        if prompt is None or isinstance(prompt, str):
            return [prompt] * batch
        prompts = list(prompt)
        if len(prompts) != batch:
            raise PromptError(
                f"got {batch} images but {len(prompts)} prompts; pass one prompt per image, or a single string "
                f"to use the same prompt for every image"
            )
        return prompts

    def _prompt_ids(self, prompt) -> list[int]:
        if prompt is not None and not isinstance(prompt, str):
            raise PromptError(f"a prompt must be a string or None, got {type(prompt).__name__}")
        if prompt is not None and not prompt.strip():
            raise PromptError("the prompt is empty; pass prompt=None (or call caption()) to caption without a prompt")
        text_ids = self.tokenizer.encode(prompt or "")
        if len(text_ids) > self.max_prompt_tokens:
            raise PromptError(
                f"the prompt is {len(text_ids)} tokens long, the engine folder allows {self.max_prompt_tokens} "
                f"(manifest generation.max_prompt_tokens); shorten it, or rebuild with "
                f"`python -m export.build ... --max-prompt-tokens {len(text_ids)}`"
            )
        return [self.image_token_id] * self.num_queries + text_ids
