"""`Blip2Pipeline`: everything an engine folder can do, no torch involved.

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_dir("engines/demo/onnx")
    pipe.caption(["cat.jpg", "dog.png"], max_new_tokens=30, num_beams=3)
    pipe.generate(images, prompt="Question: what color is the circle? Answer:")
    pipe.generate(images, prompt=["a photo of", "Question: how many? Answer:"], do_sample=True, top_p=0.9, seed=0)
    pipe.score(images, token_ids, prompt=...)      # teacher forcing: the logits that predicted each given token

    # with the Q-Former's text side (stage-1 checkpoints, or stage 2 trained here):
    pipe.itm(images, texts)                        # match probability per (image, text) pair
    pipe.similarity(pipe.embed_images(images), pipe.embed_texts(texts))   # ITC, [I, T]
    pipe.retrieve("a red circle", gallery_images, k=16)   # ITC top-k, re-ranked by ITM
    pipe.caption(images, decoder="qformer")        # ITG: the Q-Former's own text decoder
    pipe.generate(images, prompt="Question: what colour is it? Answer:", qformer_text="what colour is it?")

Images are paths, PIL images or uint8 HWC arrays. Rows of a batch may have prompts of different lengths:
they are left-padded, and a batch gives the same tokens as each image alone. Work is split into chunks of
the engine's max_batch (divided by num_beams for beam search).

The pipeline is a facade over its parts, each usable alone: `encoder` (runtime.vision: preprocessing, the
vision graph, the queries), `llm` (runtime.llm: prompts, prefill, search), `itg` (runtime.itg: Q-Former
captions) and `text` (runtime.retrieval: ITC, ITM, retrieval). `runner_factory(path, graph)` opens each graph
(the exporter passes its own to record what every graph is fed).
"""
from pathlib import Path

import numpy as np

from runtime import retrieval
from runtime.backends import make_runner
from runtime.errors import BackendError, EngineFolderError, PromptError
from runtime.image import DEFAULT_MAX_PIXELS
from runtime.itg import ItgCaptioner
from runtime.llm import LlmGenerator
from runtime.manifest import Manifest, load_manifest
from runtime.ort_runner import default_threads
from runtime.retrieval import ImageGallery, Match, QFormerText, TextGallery, check_texts
from runtime.runner import RunnerFactory
from runtime.vision import ImageEncoder

# What each optional capability needs, and how an engineer gets it.
NEEDS = {
    "llm_decoder": "a stage-2 checkpoint (Blip2ForConditionalGeneration: Q-Former + OPT)",
    "qformer_text": "a checkpoint with the Q-Former's text side (stage 1, Blip2ForImageTextRetrieval-style)",
    "qformer_itm": "a checkpoint with the Q-Former's text side and ITM head (stage 1)",
    "qformer_itg": "a stage-1 checkpoint trained by blip2-edge (it adds the ITG head)",
}


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _per_image(value, batch: int, what: str) -> list:
    """One value (None or a str) for every image, or a list with one per image."""
    if batch == 0:
        raise PromptError("no images given; pass one image or a list of images")
    if value is None or isinstance(value, str):
        return [value] * batch
    values = list(value)
    if len(values) != batch:
        raise PromptError(f"got {batch} images but {len(values)} {what}s; pass one {what} per image, or a single "
                          f"string to use the same {what} for every image")
    return values


def _graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.is_file())


def _open_largest_first(manifest: Manifest, factory: RunnerFactory) -> dict:
    """graph name -> runner, in the manifest's order, opened largest graph first: while a session loads, ONNX
    Runtime holds part of its weights twice (on a CPU, an fp16 graph's weights beside the float32 copies it computes
    with), and that moment then does not stack on the smaller graphs' memory (the full-width fp16 folder: 3.13 GiB
    peak to open vision, Q-Former, LLM in that order, 2.8 GiB LLM first)."""
    order = sorted(manifest.graphs, key=lambda name: -_graph_bytes(manifest.graph_path(name)))
    opened = {name: factory(manifest.graph_path(name), name) for name in order}
    return {name: opened[name] for name in manifest.graphs}


class Blip2Pipeline:
    def __init__(self, manifest: Manifest, backend: str = "onnxruntime", threads: int | None = None,
                 runner_factory: RunnerFactory | None = None, shared_pool: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_PIXELS, providers: list | None = None):
        self.manifest, self.backend = manifest, backend
        factory = runner_factory or self._default_factory(threads, shared_pool, providers)
        self.runners = _open_largest_first(manifest, factory)
        self.encoder = ImageEncoder(manifest, self.runners)
        self.encoder.max_image_pixels = max_image_pixels
        self.text = QFormerText(manifest, self.runners, self.encoder) if manifest.qformer else None
        self.llm = LlmGenerator(manifest, self.runners, self.encoder, self.text) if manifest.llm else None
        self.itg = ItgCaptioner(manifest, self.runners, self.encoder) if "qformer_itg" in self.runners else None
        self.max_batch = manifest.limits.max_batch

    def _default_factory(self, threads, shared_pool, providers) -> RunnerFactory:
        if self.backend == "tensorrt":  # engines are checked against the GPU and TensorRT they were built for
            if providers:
                raise BackendError(f"providers={providers!r} are ONNX Runtime's; a TensorRT engine folder runs on "
                                   f"TensorRT itself: leave providers out, or open an ONNX folder")
            return lambda path, graph: make_runner(path, "tensorrt", build_info=self.manifest.build.tensorrt,
                                                   dynamic_axes=self.manifest.graphs[graph].dynamic_axes())
        threads = threads or default_threads()
        # (OrtRunner names a provider this onnxruntime lacks before it opens its graph: before any graph is opened)
        return lambda path, graph: make_runner(path, "onnxruntime", threads=threads, shared_pool=shared_pool,
                                               providers=providers)

    @classmethod
    def from_dir(cls, folder, backend: str = "auto", threads: int | None = None,
                 runner_factory: RunnerFactory | None = None, shared_pool: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
                 providers: list | None = None) -> "Blip2Pipeline":
        """Open an engine folder written by `python -m export.build`.

        backend: "onnxruntime", "tensorrt", or "auto" (TensorRT for a TensorRT engine folder, else ONNX Runtime).
        threads: ONNX Runtime threads per graph (default: BLIP2_EDGE_THREADS, else one per core).
        shared_pool: every ONNX Runtime session of the process shares one thread pool: faster, but the process
        can then open no ONNX Runtime session with a pool of its own (see runtime.ort_runner.OrtRunner).
        runner_factory: `factory(path, graph name) -> Runner` opens each graph instead of the backend's runner.
        max_image_pixels: image files and PIL images with more pixels are refused from their header, before they
        are decoded (default 40 Mpx; None: no limit).
        providers: ONNX Runtime execution providers, in order of preference, as ONNX Runtime takes them (names or
        (name, options) pairs), e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"] with onnxruntime-gpu
        (default: the CPU's). Decoder caches stay on the first provider's device between steps.
        """
        manifest = load_manifest(folder)
        if backend == "auto":
            backend = "tensorrt" if manifest.is_tensorrt else "onnxruntime"
        if backend == "tensorrt" and not manifest.is_tensorrt:
            raise BackendError(
                f"{folder} holds ONNX graphs (target {manifest.target}); use backend='onnxruntime', or build "
                f"TensorRT engines with `python -m export.build --target trt-fp16`"
            )
        return cls(manifest, backend, threads, runner_factory, shared_pool, max_image_pixels, providers)

    def _need(self, graph: str, what: str) -> None:
        if graph not in self.runners:
            raise EngineFolderError(
                f"{what} needs the '{graph}' graph, which the engine folder {self.manifest.folder} does not have "
                f"(it has: {', '.join(self.runners)}); build it from {NEEDS[graph]} with `python -m export.build`"
            )

    def _decoder(self, decoder: str | None) -> str:
        if decoder is None:
            return "llm" if "llm_decoder" in self.runners else "qformer"
        if decoder not in ("llm", "qformer"):
            raise PromptError(f"decoder must be 'llm' or 'qformer', got {decoder!r}")
        self._need("llm_decoder" if decoder == "llm" else "qformer_itg", f"decoder={decoder!r}")
        return decoder

    def _questions(self, qformer_text, batch: int, decoder: str) -> list[str] | None:
        if qformer_text is None:
            return None
        if decoder == "qformer":
            raise PromptError("qformer_text feeds the LLM's soft prompt; with decoder='qformer' put the text in "
                              "prompt instead")
        self._need("qformer_itm", "qformer_text")
        return check_texts(_per_image(qformer_text, batch, "qformer_text"), "qformer_text")

    # ------------------------------------------------------------------ text generation
    def caption(self, images, max_new_tokens: int | None = None, num_beams: int = 1, decoder: str | None = None,
                **generation) -> list[str]:
        """One caption per image, without a text prompt. decoder: "llm" (default when the folder has one) or
        "qformer" (the Q-Former's ITG text decoder). max_new_tokens: default 30, or the folder's limit where it is
        lower. The LLM's input is what Hugging Face's
        `Blip2ForConditionalGeneration.generate(pixel_values=...)` builds: the image's soft prompt followed by
        `text_config.bos_token_id`, in the decoder's input for OPT, in the encoder's for T5 (whose decoder then
        starts from `decoder_start_token_id`; BLIP-2's T5 checkpoints set BOS to </s>)."""
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
        tokenizer = self.llm.tokenizer if decoder == "llm" else self.itg.tokenizer
        return [tokenizer.decode(row) for row in ids]

    def generate_ids(self, images, prompt=None, decoder: str | None = None, qformer_text=None,
                     **generation) -> list[list[int]]:
        """Like `generate`, but returns the new token ids of each row (EOS / [SEP] included if produced)."""
        decoder, images = self._decoder(decoder), _as_list(images)
        prompts = _per_image(prompt, len(images), "prompt")
        questions = self._questions(qformer_text, len(images), decoder)
        if decoder == "qformer":
            return self.itg.generate(images, prompts, generation)
        return self.llm.generate(images, prompts, generation, questions)

    def stream(self, image, prompt: str | None = None, qformer_text: str | None = None, **generation):
        """Generate for one image as `generate` does, yielding the text as it is produced: pieces whose
        concatenation is `generate(image, prompt, ...)[0]`; one or more tokens per piece, never half a character
        (beam search: the whole text at the end, since its best beam can change at every step)."""
        from runtime.engine import GenerationEngine
        from runtime.text import TextStream

        self._need("llm_decoder", "stream")
        engine = GenerationEngine(self)
        handle = engine.submit(image, prompt, qformer_text, **generation)
        text = TextStream(self.llm.tokenizer)
        while engine.step():  # (a request that fails leaves the engine no work: the loop ends, the error is raised)
            piece = text.push(handle.tokens)
            if piece:
                yield piece
        if handle.error is not None:
            raise handle.error
        piece = text.finish(handle.tokens)
        if piece:
            yield piece

    def score(self, images, tokens, prompt=None, decoder: str | None = None, qformer_text=None) -> list[np.ndarray]:
        """Teacher forcing: for each image and its list of token ids (e.g. another model's output, or candidate
        answers), the logits [len(tokens), V] that predicted each token when the decoder was fed the prompt and
        the tokens before it, whatever it would have chosen itself."""
        decoder, images = self._decoder(decoder), _as_list(images)
        prompts = _per_image(prompt, len(images), "prompt")
        if len(tokens) != len(images):
            raise PromptError(f"got {len(images)} images but {len(tokens)} token lists; pass one per image")
        questions = self._questions(qformer_text, len(images), decoder)
        if decoder == "qformer":
            return self.itg.score(images, prompts, [list(t) for t in tokens])
        return self.llm.score(images, prompts, [list(t) for t in tokens], questions)

    def image_prompts(self, images) -> np.ndarray:
        """The LLM soft prompt of each image: [B, num_query_tokens, llm_hidden]."""
        self._need("llm_decoder", "image_prompts")
        return self.llm.soft_prompt(self.encoder.pixels(_as_list(images)))

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
        return self.text.encode_gallery(images)

    def embed_texts(self, texts) -> np.ndarray:
        """ITC feature of each text ([CLS] through the unimodal graph): [T, D] unit vectors."""
        self._need("qformer_text", "ITC text features")
        return self.text.embed_texts(check_texts(_as_list(texts), "texts"))

    def encode_texts(self, texts) -> TextGallery:
        """Encode candidate texts once for image -> text retrieval."""
        self._need("qformer_text", "ITC text features")
        return self.text.encode_texts(check_texts(_as_list(texts), "texts"))

    @staticmethod
    def similarity(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
        """ITC similarity [I, T]: for each image and text, the largest cosine over the image's queries."""
        return retrieval.similarity(image_feats, text_feats)

    def itm(self, images, texts) -> np.ndarray:
        """Probability that each image matches its text (pairs; one image or one text is broadcast): [N]."""
        self._need("qformer_itm", "ITM")
        images, texts = _as_list(images), check_texts(_as_list(texts), "texts")
        one_text = len(texts) == 1 and len(images) > 1
        if not one_text and len(images) not in (1, len(texts)):
            raise PromptError(f"got {len(images)} images but {len(texts)} texts; pass pairs of equal length, "
                              f"or one image (or one text) to compare against all")
        embeds = self.encoder.embed_images(images)
        if one_text:  # (qformer_itm_one_text / _one_image where the folder has them)
            return self.text.itm_probs_one_text(embeds, texts[0])
        if len(images) == 1 and len(texts) > 1:
            return self.text.itm_probs_one_image(embeds, texts)
        return self.text.itm_probs(embeds, texts)

    def retrieve(self, query, candidates, k: int = 16, rerank: bool = True) -> list[Match]:
        """Two-step retrieval, best match first: ITC similarity against every candidate, then the top k
        re-ranked by ITM. A text query (str) searches images (a list of images, or an `ImageGallery` from
        `encode_gallery` so a gallery is encoded once); an image query (a pathlib.Path, PIL image or uint8
        array; a plain str is always a text) searches texts (a list of strings or a `TextGallery`)."""
        self._need("qformer_text", "retrieval")
        if rerank:
            self._need("qformer_itm", "ITM re-ranking (pass rerank=False for ITC only)")
        candidates = candidates if isinstance(candidates, (ImageGallery, TextGallery)) else _as_list(candidates)
        if isinstance(query, str):
            retrieval.check_k(k, len(candidates), "image gallery")
            gallery = candidates if isinstance(candidates, ImageGallery) else self.encode_gallery(candidates)
            return self.text.search_images(query, gallery, k, rerank)
        retrieval.check_k(k, len(candidates), "text gallery")
        texts = candidates if isinstance(candidates, TextGallery) else self.encode_texts(candidates)
        return self.text.search_texts(query, texts, k, rerank)
