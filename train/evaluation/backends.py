"""The two things an evaluation can run: a checkpoint folder with PyTorch (`TorchBackend`, through Hugging Face's
public API as its users call it) or an engine folder with the runtime (`PipelineBackend`, no torch). Both answer
the same calls (captions, answers, ITC embeddings, ITM probabilities), so the ShapesCaps evaluation
(train.shapescaps.evaluate) and the evaluation on users' data (train.evaluation.tasks) show the same numbers for
PyTorch and for an exported folder.

    from train.evaluation.backends import open_backend
    backend = open_backend(model="checkpoints/demo")          # or open_backend(engines="engines/demo/onnx")
"""
from pathlib import Path

import numpy as np

from train.training.datasets import qa_prompt

CAPABILITIES = ("caption", "vqa", "itc", "itm")
CAPTION_TOKENS = 30  # greedy caption length limit
ANSWER_TOKENS = 10  # answers are one word; a few tokens of slack for sub-word tokenizers
BATCH_SIZE = 16


class EvaluationError(ValueError):
    """Bad arguments or folder for an evaluation; the message says what to do."""


class CapabilityError(EvaluationError):
    """The model has no graph / module for the requested capability."""


# ----------------------------------------------------------------------------- backends

def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, start + size)


class TorchBackend:
    """A checkpoint folder evaluated with PyTorch, through Hugging Face's public API as its users call it
    (`train.blip2.reference.HfReference`: captions and answers from `generate`, greedy; ITC/ITM from
    `Blip2ForImageTextRetrieval`)."""

    name = "torch"

    def __init__(self, checkpoint_dir):
        from train.blip2.checkpoint import load_checkpoint
        from train.blip2.reference import HfReference

        self.folder = Path(checkpoint_dir)
        self.ck = load_checkpoint(self.folder)
        self.model = self.ck.model
        self.reference = HfReference(self.ck)
        self.image_size = int(self.ck.config.vision_config.image_size)
        self.missing = {}
        if not self.ck.has_llm:
            why = f"no language model in {self.folder} (stage-1 checkpoint)"
            self.missing.update(caption=why, vqa=why)
        if self.ck.qformer_tokenizer is None or not hasattr(self.model, "text_projection"):
            why = f"no Q-Former text side in {self.folder} (stage-2 checkpoint trained without it)"
            self.missing.update(itc=why, itm=why)
        elif not hasattr(self.model, "itm_head"):
            self.missing["itm"] = f"no ITM head in {self.folder}"
        self.capabilities = frozenset(c for c in CAPABILITIES if c not in self.missing)

    def describe(self) -> dict:
        return {"backend": self.name, "folder": str(self.folder.resolve()), "stage": self.model.edge.stage}

    def _need(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise CapabilityError(f"{capability}: {self.missing[capability]}")

    def _generate(self, images, prompts, max_new_tokens: int) -> list[str]:
        rows = self.reference.generate(list(images), prompts, max_new_tokens=max_new_tokens, num_beams=1).tokens
        return [self.ck.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]

    def caption(self, images, max_new_tokens: int = CAPTION_TOKENS, prompt: str | None = None) -> list[str]:
        self._need("caption")
        return self._generate(images, None if prompt is None else [prompt] * len(images), max_new_tokens)

    def answer(self, images, questions, max_new_tokens: int = ANSWER_TOKENS,
               qformer_question: bool = False) -> list[str]:
        self._need("vqa")
        if qformer_question:
            raise EvaluationError("Hugging Face's Blip2ForConditionalGeneration.generate has no Q-Former text input: "
                                  "evaluate a model fine-tuned with questions to the Q-Former on its engine folder "
                                  "(python -m export.build --model DIR --target onnx, then --engines)")
        return self._generate(images, [qa_prompt(q) for q in questions], max_new_tokens)

    def image_feats(self, images) -> np.ndarray:
        """[I, Nq, D] unit vectors."""
        import torch

        self._need("itc")
        with torch.no_grad():
            embeds = self.model.encode_image(self.reference.pixel_values(images))
            return self.model.image_feats(self.model.query_forward(embeds)[0]).numpy()

    def text_feats(self, texts) -> np.ndarray:
        """[T, D] unit vectors."""
        import torch

        self._need("itc")
        with torch.no_grad():
            return self.model.text_feat(*self.reference.qformer_tokens(texts)).numpy()

    def itm(self, images, texts) -> np.ndarray:
        """Match probability of each (image, text) pair: [N]."""
        self._need("itm")
        return self.reference.itm(list(images), list(texts)).numpy()

    def gallery(self, images, batch_size: int = BATCH_SIZE):
        """(ITC features [I, Nq, D], the ViT outputs kept for ITM) of many images, each encoded once."""
        import torch

        self._need("itc")
        with torch.no_grad():
            embeds = torch.cat([self.model.encode_image(self.reference.pixel_values(images[part]))
                                for part in chunks(len(images), batch_size)])
            feats = torch.cat([self.model.image_feats(self.model.query_forward(embeds[part])[0])
                               for part in chunks(len(images), batch_size)])
        return feats.numpy(), embeds

    def gallery_itm(self, embeds, rows, texts) -> np.ndarray:
        """Match probability of (gallery image rows[i], texts[i]) pairs, from the kept ViT outputs."""
        import torch

        self._need("itm")
        ids, mask = self.reference.qformer_tokens(list(texts))
        with torch.no_grad():
            logits = self.model.itm_forward(embeds[torch.as_tensor(rows)], ids, mask)[0]
        return torch.softmax(logits.double(), -1)[:, 1].float().numpy()


class PipelineBackend:
    """An engine folder evaluated with `runtime.Blip2Pipeline` (onnxruntime or TensorRT, no torch)."""

    name = "pipeline"

    def __init__(self, engine_dir, runtime_backend: str = "auto", threads: int | None = None):
        from runtime import Blip2Pipeline

        self.folder = Path(engine_dir)
        self.pipe = Blip2Pipeline.from_dir(self.folder, backend=runtime_backend, threads=threads)
        self.image_size = int(self.pipe.manifest.model.image_size)

    @property
    def missing(self) -> dict:
        from runtime.pipeline import NEEDS

        runners, missing = self.pipe.runners, {}
        if "llm_decoder" not in runners:
            why = (f"no llm_decoder graph in {self.folder} (built from a stage-1 checkpoint; "
                   f"needs {NEEDS['llm_decoder']})")
            missing.update(caption=why, vqa=why)
        if "qformer_text" not in runners or "image_feats" not in runners["qformer_query"].output_names:
            missing["itc"] = f"no qformer_text graph in {self.folder} (needs {NEEDS['qformer_text']})"
        if "qformer_itm" not in runners:
            missing["itm"] = f"no qformer_itm graph in {self.folder} (needs {NEEDS['qformer_itm']})"
        return missing

    @property
    def capabilities(self) -> frozenset:
        return frozenset(c for c in CAPABILITIES if c not in self.missing)

    def describe(self) -> dict:
        m = self.pipe.manifest
        return {"backend": self.name, "folder": str(self.folder.resolve()), "stage": m.model.stage,
                "runtime": self.pipe.backend, "target": m.target, "precision": m.precision.name}

    def _need(self, capability: str) -> None:
        missing = self.missing
        if capability in missing:
            raise CapabilityError(f"{capability}: {missing[capability]}")

    def caption(self, images, max_new_tokens: int = CAPTION_TOKENS, prompt: str | None = None) -> list[str]:
        self._need("caption")
        if prompt is not None:
            return self.pipe.generate(list(images), prompt=prompt, decoder="llm", max_new_tokens=max_new_tokens,
                                      num_beams=1)
        return self.pipe.caption(list(images), max_new_tokens=max_new_tokens, num_beams=1, decoder="llm")

    def answer(self, images, questions, max_new_tokens: int = ANSWER_TOKENS,
               qformer_question: bool = False) -> list[str]:
        self._need("vqa")
        return self.pipe.generate(list(images), prompt=[qa_prompt(q) for q in questions], decoder="llm",
                                  max_new_tokens=max_new_tokens, num_beams=1,
                                  qformer_text=list(questions) if qformer_question else None)

    def image_feats(self, images) -> np.ndarray:
        self._need("itc")
        return self.pipe.embed_images(list(images))

    def text_feats(self, texts) -> np.ndarray:
        self._need("itc")
        return self.pipe.embed_texts(list(texts))

    def itm(self, images, texts) -> np.ndarray:
        self._need("itm")
        return self.pipe.itm(list(images), list(texts))

    def gallery(self, images, batch_size: int = BATCH_SIZE):
        self._need("itc")
        g = self.pipe.encode_gallery(list(images))
        return g.feats, g.embeds

    def gallery_itm(self, embeds, rows, texts) -> np.ndarray:
        self._need("itm")
        return self.pipe.text.itm_probs(embeds[np.asarray(rows)], list(texts))


def open_backend(model=None, engines=None):
    """TorchBackend for a checkpoint folder (`model`) or PipelineBackend for an engine folder (`engines`)."""
    if (model is None) == (engines is None):
        raise EvaluationError(
            f"pass exactly one of --model DIR (a checkpoint folder, evaluated with PyTorch) or --engines DIR (an "
            f"engine folder from `python -m export.build`, evaluated with the runtime pipeline); got "
            f"{'both' if model is not None else 'neither'}")
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise EvaluationError(f"--model folder not found: {path}; pass a checkpoint folder written by training "
                                  f"(or make a random one with `python -m train.blip2.random_checkpoint --out {path}`)")
        if (path / "manifest.json").is_file() and not (path / "config.json").is_file():
            raise EvaluationError(f"{path} is an engine folder, not a checkpoint; pass it with --engines {path}")
        return TorchBackend(path)
    path = Path(engines)
    if not path.is_dir():
        raise EvaluationError(f"--engines folder not found: {path}; build one with `python -m export.build --model "
                              f"CHECKPOINT --target onnx` and pass engines/<name>/onnx")
    if (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        raise EvaluationError(f"{path} is a checkpoint folder, not an engine folder; pass it with --model {path}, or "
                              f"export it with `python -m export.build --model {path} --target onnx`")
    return PipelineBackend(path)
