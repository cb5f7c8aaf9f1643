"""BLIP-2's two training stages over a captioned-image set (ShapesCaps, or COCO captions).

    data = shapescaps_set(model.vision_model, preprocess, n=8000, image_size=64)   # frozen ViT, run once
    run_stage1(model, data, qformer_tokenizer, TrainConfig(steps=1500), run_dir / "stage1.state")
    run_stage2(model, data, tokenizer, qformer_tokenizer, TrainConfig(steps=1500), run_dir / "stage2.state")

The image encoder is frozen in both stages, so every training image goes through it once and its
output tokens are kept (`CaptionSet.embeds`). Stage 1 trains the Q-Former (queries, layers, text
embeddings, ITC/ITM/ITG heads, temperature) with ITC + ITM + ITG. Stage 2 also freezes OPT and
trains the Q-Former and the language projection with the LM loss on captions (after an optional
prompt such as "a photo of") and on answers after "Question: ... Answer:"; when the model keeps
the Q-Former's text side, the stage-1 losses stay on (weight `aux_weight`, every `aux_every` steps)
so one checkpoint does ITC/ITM/ITG as well as it did after stage 1.

Batches are a pure function of (seed, step, rank): see train.training.trainer.
"""
import logging
from dataclasses import dataclass

import numpy as np
import torch

from train.blip2.families import family
from train.shapescaps.synthetic import ShapesCaps, caption_correct, mirrored
from train.training.datasets import qa_prompt
from train.training.batches import lm_batch, qformer_batch
from train.training.losses import lm_loss, stage1_losses, world
from train.training.trainer import TrainConfig, fit, trainable

logger = logging.getLogger(__name__)


@dataclass
class CaptionSet:
    """Training images as frozen-ViT outputs, with their texts."""
    embeds: torch.Tensor  # [N, Np, Dv]
    captions: list[list[str]]
    qa: list[list[tuple[str, str]]]
    keys: list  # images with equal keys are described equally well by each other's texts
    foils: list[list[str | None]] | None = None  # per caption, a minimally changed false one (or None)

    def __len__(self) -> int:
        return len(self.captions)


@torch.no_grad()
def encode_images(vision_model, preprocess, images, batch: int = 64) -> torch.Tensor:
    vision_model.eval()
    out = [vision_model(pixel_values=torch.from_numpy(preprocess(images[s:s + batch])), return_dict=True)
           .last_hidden_state for s in range(0, len(images), batch)]
    return torch.cat(out)


def scene_key(shapes) -> tuple:
    return tuple(sorted((s.colour, s.shape, s.size, s.position) for s in shapes))


def shapescaps_set(vision_model, preprocess, n: int, image_size: int, seed: int = 0,
                   split: str = "train") -> CaptionSet:
    data = ShapesCaps(split, n=n, image_size=image_size, seed=seed)
    samples = list(data)
    embeds = encode_images(vision_model, preprocess, [s.image for s in samples])
    return CaptionSet(embeds, [s.captions for s in samples], [s.qa for s in samples],
                      [scene_key(s.shapes) for s in samples], [[_foil(c, s) for c in s.captions] for s in samples])


def _foil(caption: str, sample) -> str | None:
    """The caption with its layout mirrored, when that makes it false for the sample."""
    foil = mirrored(caption)
    return foil if foil is not None and not caption_correct(foil, sample) else None


# ---------------------------------------------------------------- batches
class Batches:
    """Indices and captions of every process's batch at a step, drawn from (seed, step, rank)."""

    def __init__(self, data: CaptionSet, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def pick(self, step: int, rank: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([self.seed, step, rank])
        return rng.choice(len(self.data), size=min(self.batch_size, len(self.data)), replace=False), rng

    def captions(self, index: np.ndarray, rng) -> tuple[list[str], list[str | None]]:
        """One caption per image, and its foil (None where the set has none)."""
        picks = [(i, rng.integers(len(self.data.captions[i]))) for i in index]
        foils = self.data.foils
        return [self.data.captions[i][j] for i, j in picks], [foils[i][j] if foils else None for i, j in picks]

    def same(self, step: int, index: np.ndarray) -> torch.Tensor:
        """[B, B*W] True where another row's scene equals this row's (every process's batch is known)."""
        _, size = world()
        every = np.concatenate([self.pick(step, r)[0] for r in range(size)])
        keys = self.data.keys
        same = torch.tensor([[keys[i] == keys[j] for j in every] for i in index])
        rank, _ = world()
        own = torch.arange(len(index))
        same[own, rank * len(index) + own] = False  # the pair itself is the positive, not "same"
        return same


def stage1_batch(model, batches: Batches, qtok, step: int) -> dict:
    rank, _ = world()
    index, rng = batches.pick(step, rank)
    texts, foils = batches.captions(index, rng)
    ids, mask = qformer_batch(qtok, texts, model.edge.max_text_tokens)
    batch = {"image_embeds": batches.data.embeds[index], "ids": ids, "mask": mask, "same": batches.same(step, index)}
    has_foil = torch.tensor([f is not None for f in foils])
    if has_foil.any():
        foil_ids, foil_mask = qformer_batch(qtok, [f for f in foils if f is not None], model.edge.max_text_tokens)
        batch["foils"] = (has_foil, foil_ids, foil_mask)
    return batch


# ---------------------------------------------------------------- the stages
def run_stage1(model, data: CaptionSet, qtok, cfg: TrainConfig, state_file=None) -> None:
    """ITC + ITM + ITG on the Q-Former; the image encoder (and any LLM) stays frozen."""
    batches = Batches(data, cfg.batch_size, cfg.seed)
    params = trainable(model, ("vision_model.", "language_model.", "language_projection."))

    def objective(step, generator):
        b = stage1_batch(model, batches, qtok, step)
        return stage1_losses(model, b["image_embeds"], b["ids"], b["mask"], b["same"], generator, b.get("foils"))

    fit("stage1", model, params, objective, cfg, state_file)


def run_stage2(model, data: CaptionSet, tok, qtok, cfg: TrainConfig, state_file=None, qa_fraction: float = 0.5,
               caption_prompt: str | None = None, aux_weight: float = 1.0, aux_every: int = 1) -> None:
    """The frozen LLM's loss (train.blip2.families: OPT's language-modelling loss, T5's prefix-LM loss) on captions and
    answers; Q-Former + projection trained. Captions follow `caption_prompt`, or with None, what the family
    trains captioning on (OPT: the soft prompt and BOS; T5: that, or a prefix of the caption in the encoder)."""
    batches = Batches(data, cfg.batch_size, cfg.seed + 1)
    llm = family(model.config)
    params = trainable(model, ("vision_model.", "language_model."))
    keep_text_side = hasattr(model, "itm_head") and qtok is not None and aux_weight > 0

    def objective(step, generator):
        rank, _ = world()
        index, rng = batches.pick(step, rank)
        examples = []
        for i in index:
            qa = data.qa[i]
            if qa and rng.random() < qa_fraction:
                question, answer = qa[rng.integers(len(qa))]
                examples.append((qa_prompt(question), answer))
            else:
                caption = data.captions[i][rng.integers(len(data.captions[i]))]
                examples.append(llm.caption_example(caption, rng) if caption_prompt is None
                                else (caption_prompt, caption))
        losses = {"lm": lm_loss(model, data.embeds[index], lm_batch(model, tok, examples))}
        losses["loss"] = losses["lm"]
        if keep_text_side and step % aux_every == 0:
            b = stage1_batch(model, batches, qtok, step)
            aux = stage1_losses(model, b["image_embeds"], b["ids"], b["mask"], b["same"], generator, b.get("foils"))
            losses.update({k: v for k, v in aux.items() if k != "loss"})
            losses["loss"] = losses["lm"] + aux_weight * aux["loss"]
        return losses

    model.language_model.eval()  # frozen: no dropout either
    fit("stage2", model, params, objective, cfg, state_file)
