"""Pre-training the frozen backbones on ShapesCaps, since none can be downloaded here.

BLIP-2 freezes a pretrained image encoder and a pretrained LLM. With real backbones (a local HF
folder) this step is skipped; for the synthetic set we make our own, quickly:

  * the ViT learns to name what is in the image: a multi-label classifier over attribute
    tuples (colour-shape, colour@position, shape@position, size-shape, count) reads its output
    tokens (class token + mean of the patches);
  * OPT learns the language of the captions and question/answer strings (next-token loss),
    because a frozen random LLM cannot be prompted.

    vision = pretrain_vision(model.vision_model, image_size=64, steps=400)   # in place
    pretrain_llm(model.language_model, tokenizer, steps=600)                    # in place
"""
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.data import COLOURS, POSITIONS, SHAPES, SIZES, ShapesCaps, text_corpus
from train.trainer import TrainConfig, fit

ATTRIBUTES = sorted(
    {f"{c}-{s}" for c, s in itertools.product(COLOURS, SHAPES)}
    | {f"{c}@{p}" for c, p in itertools.product(COLOURS, POSITIONS)}
    | {f"{s}@{p}" for s, p in itertools.product(SHAPES, POSITIONS)}
    | {f"{z}-{s}" for z, s in itertools.product(SIZES, SHAPES)}
    | {"n1", "n2"}
)
INDEX = {a: i for i, a in enumerate(ATTRIBUTES)}


def attribute_targets(shapes) -> np.ndarray:
    """Multi-hot [len(ATTRIBUTES)] of a scene."""
    y = np.zeros(len(ATTRIBUTES), dtype=np.float32)
    for s in shapes:
        for key in (f"{s.colour}-{s.shape}", f"{s.colour}@{s.position}", f"{s.shape}@{s.position}",
                    f"{s.size}-{s.shape}"):
            y[INDEX[key]] = 1.0
    y[INDEX[f"n{len(shapes)}"]] = 1.0
    return y


class AttributeProbe(nn.Module):
    """The classifier used for pre-training only (discarded afterwards)."""

    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model
        width = vision_model.config.hidden_size
        self.head = nn.Linear(2 * width, len(ATTRIBUTES))

    def forward(self, pixel_values):  # [B, 3, H, W] -> [B, A] logits
        tokens = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state  # [B, Np, Dv]
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))


def pretrain_vision(vision_model, preprocess, image_size: int, cfg: TrainConfig, seed: int = 0, say=print,
                    state_file=None):
    """Train `vision_model` in place on attribute classification over fresh ShapesCaps images."""
    probe = AttributeProbe(vision_model).train()
    data = ShapesCaps("train", n=10_000_000, image_size=image_size, seed=seed + 1)  # effectively endless

    def objective(step, generator):
        rng = np.random.default_rng([seed, step])
        samples = [data[int(i)] for i in rng.integers(0, len(data), cfg.batch_size)]
        pixels = torch.from_numpy(preprocess([s.image for s in samples]))
        targets = torch.from_numpy(np.stack([attribute_targets(s.shapes) for s in samples]))
        logits = probe(pixels)
        accuracy = ((logits > 0) == (targets > 0.5)).all(1).float().mean()
        return {"loss": F.binary_cross_entropy_with_logits(logits, targets), "exact": accuracy.detach()}

    fit("vision", probe, list(probe.parameters()), objective, cfg, state_file, say=say)
    return vision_model.eval()


def pretrain_llm(language_model, tokenizer, cfg: TrainConfig, n_texts: int = 20000, seed: int = 0, say=print,
                 state_file=None):
    """Train the OPT decoder in place as a language model of the captions and Q/A strings."""
    texts = sorted(set(text_corpus(n_train=n_texts, seed=seed)))
    eos = tokenizer.eos_token_id
    rows = [tokenizer(t).input_ids + [eos] for t in texts]
    language_model.train()

    def objective(step, generator):
        rng = np.random.default_rng([seed, step])
        batch = [rows[int(i)] for i in rng.integers(0, len(rows), cfg.batch_size)]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        labels = ids.masked_fill(mask == 0, -100)
        logits = language_model(input_ids=ids, attention_mask=mask, return_dict=True).logits
        return {"loss": F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)}

    fit("llm", language_model, [p for p in language_model.parameters() if p.requires_grad], objective, cfg,
        state_file, say=say)
    return language_model.eval()
