"""`Blip2Pipeline`: everything an engine folder can do, no torch involved.

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_dir("engines/demo/onnx")
    pipe.caption(["cat.jpg", "dog.png"], max_new_tokens=30, num_beams=3)
    pipe.generate(images, prompt="Question: what color is the circle? Answer:")
    pipe.generate(images, prompt=["a photo of", "Question: how many? Answer:"], do_sample=True, top_p=0.9, seed=0)

    # with the Q-Former's text side (stage-1 checkpoints, or stage 2 trained here):
    pipe.itm(images, texts)                        # match probability per (image, text) pair
    pipe.similarity(pipe.embed_images(images), pipe.embed_texts(texts))   # ITC, [I, T]
    pipe.retrieve("a red circle", gallery_images, k=16)   # ITC top-k, re-ranked by ITM
    pipe.caption(images, decoder="qformer")        # ITG: the Q-Former's own text decoder
    pipe.generate(images, prompt="Question: what colour is it? Answer:", qformer_text="what colour is it?")

Images are paths, PIL images or uint8 HWC arrays. Rows of a batch may have
prompts of different lengths: they are left-padded, and a batch gives the same
tokens as captioning each image alone. Work is split into chunks of the
engine's max_batch (divided by num_beams for beam search).
"""

import numpy as np

from runtime import retrieval, search
from runtime.decoder import LlmDecoder, QFormerDecoder
from runtime.errors import BackendError, EngineFolderError, PromptError
from runtime.image import ImageProcessorConfig
from runtime.manifest import load_manifest
from runtime.retrieval import ImageGallery, Match, TextGallery
from runtime.runners import default_threads, make_runner
from runtime.text import PromptTokenizer, QFormerTokenizer, pad_rows

# What each optional capability needs, and how an engineer gets it.
NEEDS = {
    "llm_decoder": "a stage-2 checkpoint (Blip2ForConditionalGeneration: Q-Former + OPT)",
    "qformer_text": "a checkpoint with the Q-Former's text side (stage 1, Blip2ForImageTextRetrieval-style)",
    "qformer_itm": "a checkpoint with the Q-Former's text side and ITM head (stage 1)",
    "qformer_itg": "a stage-1 checkpoint trained by blip2-edge (it adds the ITG head)",
}


def _search_config(generation: dict, eos_token_id: int, pad_token_id: int) -> search.GenerationConfig:
    """A validated GenerationConfig from the caller's options; unknown options are named."""
    known = set(search.GenerationConfig.__dataclass_fields__) - {"eos_token_id", "pad_token_id"}
    unknown = sorted(set(generation) - known)
    if unknown:
        raise PromptError(f"unknown generation option(s) {unknown}; valid options are {sorted(known)}")
    return search.GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **generation).validate()


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class Blip2Pipeline:
    def __init__(self, manifest, backend: str = "onnxruntime", threads: int | None = None):
        self.manifest = manifest
        self.backend = backend
        self.runners = {name: make_runner(manifest.graph_path(name), backend, **self._runner_options(name, threads))
                        for name in manifest.graphs}
        self.image_config = ImageProcessorConfig.from_dict(manifest["image"])
        self.num_queries = manifest["model"]["num_query_tokens"]
        gen, qformer = manifest.data.get("generation"), manifest.data.get("qformer")
        self.max_batch = (gen or qformer)["max_batch"]
        if gen:
            self.tokenizer = PromptTokenizer.from_manifest(manifest)
            self.decoder = LlmDecoder(self.runners["llm_decoder"], manifest)
            self.image_token_id = manifest["model"]["image_token_id"]
            self.eos_token_id, self.pad_token_id = gen["eos_token_id"], gen["pad_token_id"]
            self.max_prompt_tokens, self.max_new_tokens = gen["max_prompt_tokens"], gen["max_new_tokens"]
        if qformer:
            self.qtokenizer = QFormerTokenizer.from_manifest(manifest)
            if "qformer_itg" in self.runners:
                self.itg = QFormerDecoder(self.runners["qformer_itg"], self.num_queries)

    def _runner_options(self, graph: str, threads: int | None) -> dict:
        if self.backend == "tensorrt":  # engines are checked against the GPU and TensorRT they were built for
            return {"build_info": self.manifest.data.get("tensorrt"),
                    "dynamic_axes": self.manifest.graphs[graph].get("dynamic_axes")}
        return {"threads": threads or default_threads()}

    def _need(self, graph: str, what: str) -> None:
        if graph not in self.runners:
            raise EngineFolderError(
                f"{what} needs the '{graph}' graph, which the engine folder {self.manifest.folder} does not have "
                f"(it has: {', '.join(self.runners)}); build it from {NEEDS[graph]} with `python -m export.build`"
            )

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
    def caption(self, images, max_new_tokens: int = 30, num_beams: int = 1, decoder: str | None = None,
                **generation) -> list[str]:
        """One caption per image (no text prompt). decoder: "llm" (default when the folder has one) or
        "qformer" (the Q-Former's ITG text decoder)."""
        return self.generate(images, prompt=None, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             decoder=decoder, **generation)

    def generate(self, images, prompt=None, decoder: str | None = None, qformer_text=None, **generation) -> list[str]:
        """Generate text for each image, optionally after a prompt (one string, or one per image).

        qformer_text: a text (or one per image) fed to the Q-Former with the image through the bi-directional
        graph, so the LLM's soft prompt depends on the question (BLIP-2's question-aware queries).
        generation: max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_k, top_p,
        repetition_penalty, length_penalty, early_stopping, seed (see runtime.search.GenerationConfig).
        """
        decoder = self._decoder(decoder)
        ids = self.generate_ids(images, prompt, decoder=decoder, qformer_text=qformer_text, **generation)
        tok = self.tokenizer if decoder == "llm" else self.qtokenizer
        return [tok.decode(row) for row in ids]

    def generate_ids(self, images, prompt=None, decoder: str | None = None, qformer_text=None,
                     **generation) -> list[list[int]]:
        """Like `generate`, but returns the new token ids of each row (EOS / [SEP] included if produced)."""
        decoder = self._decoder(decoder)
        images = _as_list(images)
        prompts = self._prompts(prompt, len(images))
        if decoder == "qformer":
            if qformer_text is not None:
                raise PromptError("qformer_text feeds the LLM's soft prompt; with decoder='qformer' put the text "
                                  "in prompt instead")
            return self._generate_qformer(images, prompts, generation)
        cfg = self._generation_config(generation)
        rows = [self._prompt_ids(p) for p in prompts]  # validate every prompt before running anything
        questions = None
        if qformer_text is not None:
            self._need("qformer_itm", "qformer_text")
            questions = self._texts(self._prompts(qformer_text, len(images)), "qformer_text")
        pixel_values = self.image_config(images)
        chunk = max(1, self.max_batch // cfg.num_beams)
        out = []
        for start in range(0, len(images), chunk):
            part = slice(start, start + chunk)
            soft_prompt = self._soft_prompt(pixel_values[part], questions[part] if questions else None)
            out += self._generate_chunk(soft_prompt, rows[part], cfg)
        return out

    # ------------------------------------------------------------------ Q-Former: ITC, ITM, retrieval
    def embed_images(self, images) -> np.ndarray:
        """ITC features of each image: [I, num_queries, D] unit vectors (one per query)."""
        return self.encode_gallery(images).feats

    def encode_gallery(self, images) -> ImageGallery:
        """Encode candidate images once (ITC features + image embeddings for ITM); save/load it for reuse."""
        self._need("qformer_text", "ITC image features")
        images = _as_list(images)
        if not images:
            raise PromptError("no images given; pass one image or a list of images")
        embeds = self._encode_images(images)
        feats = [self.runners["qformer_query"].run({"image_embeds": embeds[s:s + self.max_batch]})["image_feats"]
                 for s in range(0, len(embeds), self.max_batch)]
        return ImageGallery(np.concatenate(feats), embeds)

    def embed_texts(self, texts) -> np.ndarray:
        """ITC feature of each text ([CLS] through the unimodal graph): [T, D] unit vectors."""
        self._need("qformer_text", "ITC text features")
        texts = self._texts(_as_list(texts), "texts")
        out = []
        for start in range(0, len(texts), self.max_batch):
            ids, mask = self.qtokenizer.encode_texts(texts[start:start + self.max_batch])
            out.append(self.runners["qformer_text"].run({"input_ids": ids, "attention_mask": mask})["text_feat"])
        return np.concatenate(out)

    @staticmethod
    def similarity(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """ITC similarity [I, T]: for each image and text, the largest cosine over the image's queries."""
        return retrieval.similarity(image_feats, text_feats)

    def itm(self, images, texts) -> np.ndarray:
        """Probability that each image matches its text (pairs; one image or one text is broadcast): [N]."""
        self._need("qformer_itm", "ITM")
        images, texts = _as_list(images), self._texts(_as_list(texts), "texts")
        if len(texts) == 1 and len(images) > 1:
            texts = texts * len(images)
        if len(images) not in (1, len(texts)):
            raise PromptError(f"got {len(images)} images but {len(texts)} texts; pass pairs of equal length, "
                              f"or one image (or one text) to compare against all")
        embeds = self._encode_images(images)
        return self._itm_probs(np.repeat(embeds, len(texts) // len(images), axis=0), texts)

    def retrieve(self, query, candidates, k: int = 16, rerank: bool = True) -> list[Match]:
        """Two-step retrieval, best match first: ITC similarity against every candidate, then the top k
        re-ranked by ITM. A text query (str) searches images (a list of images, or an `ImageGallery` from
        `encode_gallery` so a gallery is encoded once); an image query (a pathlib.Path, PIL image or uint8
        array; a plain str is always a text) searches texts (a list of strings or a `TextGallery`)."""
        candidates = candidates if isinstance(candidates, (ImageGallery, TextGallery)) else _as_list(candidates)
        if isinstance(query, str):
            k = retrieval.check_k(k, len(candidates), "image gallery")
            gallery = candidates if isinstance(candidates, ImageGallery) else self.encode_gallery(candidates)
            itc = self.similarity(gallery.feats, self.embed_texts([query]))[:, 0]
            probs = (lambda idx: self._itm_probs(gallery.embeds[idx], [query] * len(idx))) if rerank else None
            return retrieval.rank(itc, k, probs)
        k = retrieval.check_k(k, len(candidates), "text gallery")
        texts = candidates if isinstance(candidates, TextGallery) else self.encode_texts(candidates)
        image = self.encode_gallery([query])
        itc = self.similarity(image.feats, texts.feats)[0]
        probs = (lambda idx: self._itm_probs(np.repeat(image.embeds, len(idx), 0), [texts.texts[i] for i in idx])
                 ) if rerank else None
        return retrieval.rank(itc, k, probs)

    def encode_texts(self, texts) -> TextGallery:
        """Encode candidate texts once for image -> text retrieval."""
        texts = self._texts(_as_list(texts), "texts")
        return TextGallery(texts, self.embed_texts(texts))

    def image_prompts(self, images) -> np.ndarray:
        """The LLM soft prompt of each image: [B, num_query_tokens, llm_hidden]."""
        return self._soft_prompt(self.image_config(_as_list(images)))

    # ------------------------------------------------------------------ steps
    def _image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.runners["vision"].run({"pixel_values": pixel_values})["image_embeds"]

    def _encode_images(self, images: list) -> np.ndarray:
        """Vision-tower outputs of every image, max_batch at a time: [N, Np, Dv]."""
        return np.concatenate([self._image_embeds(self.image_config(images[s:s + self.max_batch]))
                               for s in range(0, len(images), self.max_batch)])

    def _soft_prompt(self, pixel_values: np.ndarray, questions: list[str] | None = None) -> np.ndarray:
        image_embeds = self._image_embeds(pixel_values)
        if questions is None:
            return self.runners["qformer_query"].run({"image_embeds": image_embeds})["llm_prompt"]
        ids, mask = self.qtokenizer.encode_texts(questions)
        feeds = {"image_embeds": image_embeds, "input_ids": ids, "attention_mask": mask}
        return self.runners["qformer_itm"].run(feeds)["llm_prompt"]

    def _itm_probs(self, image_embeds: np.ndarray, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.max_batch):
            ids, mask = self.qtokenizer.encode_texts(texts[start:start + self.max_batch])
            feeds = {"image_embeds": image_embeds[start:start + self.max_batch], "input_ids": ids,
                     "attention_mask": mask}
            logits = self.runners["qformer_itm"].run(feeds)["itm_logits"].astype(np.float64)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            out.append((e[:, 1] / e.sum(-1)).astype(np.float32))
        return np.concatenate(out)

    def _generate_qformer(self, images, prompts, generation) -> list[list[int]]:
        """ITG: the queries' keys/values are computed once per image; each step feeds one text token."""
        self._need("qformer_itg", "decoder='qformer'")
        info = self.manifest["qformer"]
        cfg = _search_config(generation, info["sep_token_id"], info["pad_token_id"])
        ids, mask = self.qtokenizer.encode_prompts(prompts)  # validates every prompt first
        room = info["max_text_tokens"] - ids.shape[1]
        if cfg.max_new_tokens > room:
            raise PromptError(f"max_new_tokens={cfg.max_new_tokens} does not fit: the Q-Former takes "
                              f"{info['max_text_tokens']} text tokens (manifest qformer.max_text_tokens) and the "
                              f"prompt uses {ids.shape[1]}; ask for at most {room}")
        pixel_values = self.image_config(images)
        chunk = max(1, self.max_batch // cfg.num_beams)
        out = []
        for start in range(0, len(images), chunk):
            part = slice(start, start + chunk)
            logits = self._prefill_qformer(pixel_values[part], ids[part], mask[part])
            out += search.generate(self.itg, logits, ids[part], cfg, prompt_mask=mask[part])
        return out

    def _generate_chunk(self, soft_prompt, rows, cfg) -> list[list[int]]:
        logits, input_ids = self._prefill_llm(soft_prompt, rows)
        return search.generate(self.decoder, logits, input_ids, cfg)

    def _prefill_llm(self, soft_prompt, rows) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad the prompt rows and run the LLM's prefill: (first-step logits [B, V], input_ids [B, T])."""
        input_ids, attention_mask = pad_rows(rows, self.pad_token_id, left=True)
        return self.decoder.prefill(input_ids, attention_mask, soft_prompt), input_ids

    def _prefill_qformer(self, pixel_values, ids, mask) -> np.ndarray:
        """Queries once per image, then the ITG prefill of the prompt rows: first-step logits [B, V]."""
        query = self.runners["qformer_query"].run({"image_embeds": self._image_embeds(pixel_values)})
        return self.itg.prefill(ids, mask, query)

    # ------------------------------------------------------------------ input checks
    def _decoder(self, decoder: str | None) -> str:
        if decoder is None:
            return "llm" if "llm_decoder" in self.runners else "qformer"
        if decoder not in ("llm", "qformer"):
            raise PromptError(f"decoder must be 'llm' or 'qformer', got {decoder!r}")
        self._need("llm_decoder" if decoder == "llm" else "qformer_itg", f"decoder={decoder!r}")
        return decoder

    def _texts(self, texts: list, what: str) -> list[str]:
        if not texts:
            raise PromptError(f"no {what} given; pass one string or a list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise PromptError(f"{what}[{i}] is {'empty' if isinstance(t, str) else type(t).__name__}; "
                                  f"every text must be a non-empty string")
        return list(texts)

    def _generation_config(self, generation: dict) -> search.GenerationConfig:
        cfg = _search_config(generation, self.eos_token_id, self.pad_token_id)
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
