"""Pre-training the frozen backbones on ShapesCaps, since none can be downloaded here.

BLIP-2 freezes a pretrained image encoder and a pretrained LLM. With real backbones (a local HF
folder) this step is skipped; for the synthetic set we make our own, quickly:

  * the ViT learns to name what is in the image and where: a multi-label classifier over attribute
    tuples (colour-shape, colour@position, shape@position, size-shape, count, and the bound ones
    colour-shape@position and size@position) reads its class token, and every patch token is
    classified by the colour and the kind of shape that covers it (BLIP-2's Q-Former reads the patch
    tokens, so they must carry the scene locally). The class token alone must say which shape is
    where: with the mean of the patches beside it, it did not, and nothing downstream could recover
    the layout of a pair (the Q-Former told a caption from its mirror image at chance);
  * OPT learns the language of the captions (next-token loss), because a frozen random LLM cannot be
    prompted, and to continue a text from what it read earlier (`llm_rows`: a caption, BOS, then another
    caption of the scene, the same one, or a question about it and the answer; random token sequences
    repeated; only the continuation is scored), the ability that lets a frozen LLM read BLIP-2's soft
    prompt.

    pretrain_vision(model.vision_model, preprocess, 64, TrainConfig(steps=2000))   # in place
    pretrain_llm(model.language_model, tokenizer, TrainConfig(steps=12000))        # in place
"""
import itertools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.shapescaps.synthetic import COLOURS, POSITIONS, SHAPES, SIZES, ShapesCaps, context_corpus, label_map
from train.blip2.families import padded_rows
from train.training.trainer import TrainConfig, fit

logger = logging.getLogger(__name__)

ATTRIBUTES = sorted(
    {f"{c}-{s}" for c, s in itertools.product(COLOURS, SHAPES)}
    | {f"{c}@{p}" for c, p in itertools.product(COLOURS, POSITIONS)}
    | {f"{s}@{p}" for s, p in itertools.product(SHAPES, POSITIONS)}
    | {f"{z}-{s}" for z, s in itertools.product(SIZES, SHAPES)}
    | {f"{c}-{s}@{p}" for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)}
    | {f"{z}@{p}" for z, p in itertools.product(SIZES, POSITIONS)}
    | {"n1", "n2"}
)
INDEX = {a: i for i, a in enumerate(ATTRIBUTES)}


def attribute_targets(shapes) -> np.ndarray:
    """Multi-hot [len(ATTRIBUTES)] of a scene."""
    y = np.zeros(len(ATTRIBUTES), dtype=np.float32)
    for s in shapes:
        for key in (f"{s.colour}-{s.shape}", f"{s.colour}@{s.position}", f"{s.shape}@{s.position}",
                    f"{s.size}-{s.shape}", f"{s.colour}-{s.shape}@{s.position}", f"{s.size}@{s.position}"):
            y[INDEX[key]] = 1.0
    y[INDEX[f"n{len(shapes)}"]] = 1.0
    return y


POSITION_STD = 0.5  # about the spread of the patch embeddings of ShapesCaps images at initialisation


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings [1 + grid*grid, width] (MAE's), class token first (zeros), scaled to
    POSITION_STD. HF initialises them at std 0.02, 25x below the patch embeddings: the ViT then hardly
    knows where a patch is, and learns "where" (which the captions are about) slowly."""
    freq = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))  # [W/4]
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each, row-major as the patches

    def encode(pos):  # [G, G] -> [G*G, W/2]
        angle = pos.reshape(-1, 1) * freq
        return torch.cat([angle.sin(), angle.cos()], 1)

    table = torch.cat([encode(rows), encode(cols)], 1)  # [G*G, W]
    table = table * (POSITION_STD / table.std())
    return torch.cat([torch.zeros(1, width), table])


COLOUR_INDEX = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0: background
SHAPE_INDEX = {s: i + 1 for i, s in enumerate(SHAPES)}  # 0: no shape


def patch_targets(shapes, image_size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major, as the ViT orders them): colour and shape-kind class of the shape covering
    at least a quarter of it (0 when none does)."""
    grid = image_size // patch
    labels = label_map(shapes, grid * patch).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3)
    labels = labels.reshape(grid * grid, patch * patch)
    counts = np.stack([(labels == k + 1).sum(1) for k in range(len(shapes))], 1)  # [G*G, shapes]
    owner = np.where(counts.max(1) * 4 >= patch * patch, counts.argmax(1) + 1, 0)
    colour = np.array([0] + [COLOUR_INDEX[s.colour] for s in shapes])[owner]
    kind = np.array([0] + [SHAPE_INDEX[s.shape] for s in shapes])[owner]
    return colour, kind


class AttributeProbe(nn.Module):
    """The classifiers used for pre-training only (discarded afterwards)."""

    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model
        width = vision_model.config.hidden_size
        self.head = nn.Linear(width, len(ATTRIBUTES))
        self.patch_colour = nn.Linear(width, len(COLOURS) + 1)
        self.patch_kind = nn.Linear(width, len(SHAPES) + 1)

    def forward(self, pixel_values):
        """[B, 3, H, W] -> attribute logits [B, A], patch colour logits [B, P, C+1], patch kind logits [B, P, S+1]."""
        tokens = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state  # [B, Np, Dv]
        patches = tokens[:, 1:]
        return self.head(tokens[:, 0]), self.patch_colour(patches), self.patch_kind(patches)


def pretrain_vision(vision_model, preprocess, image_size: int, cfg: TrainConfig, seed: int = 0,
                    state_file=None):
    """Train `vision_model` in place on attribute classification over fresh ShapesCaps images."""
    probe = AttributeProbe(vision_model).train()
    patch = vision_model.config.patch_size
    with torch.no_grad():  # (a resumed run loads its own state over this)
        embeddings = vision_model.embeddings
        embeddings.position_embedding.copy_(sincos_positions(image_size // patch, embeddings.embed_dim)[None])
    data = ShapesCaps("train", n=10_000_000, image_size=image_size, seed=seed + 1)  # effectively endless

    def objective(step, generator):
        rng = np.random.default_rng([seed, step])
        samples = [data[int(i)] for i in rng.integers(0, len(data), cfg.batch_size)]
        pixels = torch.from_numpy(preprocess([s.image for s in samples]))
        targets = torch.from_numpy(np.stack([attribute_targets(s.shapes) for s in samples]))
        dense = [patch_targets(s.shapes, image_size, patch) for s in samples]
        colour = torch.from_numpy(np.stack([d[0] for d in dense])).long()  # [B, P]
        kind = torch.from_numpy(np.stack([d[1] for d in dense])).long()
        logits, colour_logits, kind_logits = probe(pixels)
        losses = {
            "attributes": F.binary_cross_entropy_with_logits(logits, targets),
            "patch_colour": F.cross_entropy(colour_logits.transpose(1, 2), colour),
            "patch_kind": F.cross_entropy(kind_logits.transpose(1, 2), kind),
        }
        losses["loss"] = losses["attributes"] + losses["patch_colour"] + losses["patch_kind"]
        losses["exact"] = ((logits > 0) == (targets > 0.5)).all(1).float().mean().detach()
        return losses

    fit("vision", probe, list(probe.parameters()), objective, cfg, state_file)
    return vision_model.eval()


def llm_rows(tokenizer, n_texts: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(token row, context length) pairs OPT pre-trains on; the loss skips the first `context length`
    tokens' successors, so only what can be predicted is scored:

      * every caption alone: BOS, caption, EOS (context 1: the whole caption is scored);
      * every context pair laid out as stage 2 lays out the soft prompt and its text: context, BOS,
        continuation, EOS (only the continuation is scored);
      * one random token sequence per sample followed by itself (`copy_rows`; only the copy is scored).

    Scoring the contexts as well (their tokens are as unpredictable as any caption's, the random ones
    maximally so) drowned the reading-back signal: OPT re-said two-shape captions 0.74 right after
    8,000 steps; scored on the continuations only, 1.00 (n = 68, seed 0)."""
    pairs = sorted(set(context_corpus(n_train=n_texts, seed=seed)))
    captions = sorted({context for context, _ in pairs})
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(texts):
        return tokenizer(texts, add_special_tokens=False).input_ids

    rows = [([bos] + ids + [eos], 1) for ids in encode(captions)]
    contexts, continuations = encode([c for c, _ in pairs]), encode([t for _, t in pairs])
    rows += [(c + [bos] + t + [eos], len(c) + 1) for c, t in zip(contexts, continuations)]
    return rows + copy_rows(tokenizer, n_texts, seed)


def random_sequences(tokenizer, n: int, seed: int = 0, lengths: tuple[int, int] = (5, 13)) -> list[list[int]]:
    """`n` random sequences of ordinary tokens (no special or added token), of lengths in `lengths`."""
    rng = np.random.default_rng([seed, 7])
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ordinary = np.array([i for i in range(len(tokenizer)) if i not in special])
    return [[int(t) for t in rng.choice(ordinary, int(rng.integers(*lengths)))] for _ in range(n)]


def copy_rows(tokenizer, n: int, seed: int = 0, lengths: tuple[int, int] = (5, 13)) -> list[tuple[list[int], int]]:
    """`n` rows 'x BOS x EOS' with x a random sequence of ordinary tokens, with their context length
    (x and BOS): the classic curriculum for the attention heads that find where they are in a context
    and read on from there (induction heads), which a caption's 'colour then shape' order alone teaches
    slowly."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [(x + [bos] + x + [eos], len(x) + 1) for x in random_sequences(tokenizer, n, seed, lengths)]


def llm_batch(rows: list[tuple[list[int], int]], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask [B, T] and next-token labels [B, T-1] (-100 where not scored:
    padding, and every position whose next token is still context)."""
    ids, mask, labels = padded_rows([r for r, _ in rows], [[-100] * context + r[context:] for r, context in rows],
                                    pad_token_id)
    return ids, mask, labels[:, 1:]  # labels[:, t] is the token at t + 1


def seq2seq_rows(tokenizer, n_texts: int, seed: int = 0, copies: int = 3) -> list[tuple[list[int], list[int]]]:
    """(encoder ids, decoder target ids) T5 pre-trains on, laid out as stage 2 lays out the soft prompt and its
    text (the context taking the soft prompt's place in the encoder, the decoder generating what follows):

      * every caption copied from the encoder (a caption is what stage 2 asks the decoder to say about the soft
        prompt);
      * every context pair: a caption in the encoder, and the next caption of the scene or the same one
        generated; for a question, the question follows the caption in the encoder and the answer is
        generated (stage 2's VQA layout);
      * `copies` random token sequences per sample, copied from the encoder (`random_sequences`).

    No row asks for a caption from an empty encoder: such rows teach the decoder to say a likely caption
    whatever the encoder holds, and cross-attention that reads the context is what BLIP-2 needs (two-shape
    captions re-said from the encoder, 2,000 steps: 0.30 with them and one copy per sample, 0.42 without
    them and with three)."""
    eos = tokenizer.eos_token_id
    pairs = sorted(set(context_corpus(n_train=n_texts, seed=seed)))
    captions = sorted({context for context, _ in pairs})
    sources, targets = [], []
    for context, continuation in pairs:
        if continuation.startswith("Question:"):
            question, answer = continuation.rsplit("Answer:", 1)
            sources.append(f"{context} {question}Answer:")
            targets.append(answer.strip())
        else:
            sources.append(context)
            targets.append(continuation)

    def encode(texts):
        return [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False).input_ids]

    rows = [(ids, ids) for ids in encode(captions)] + list(zip(encode(sources), encode(targets)))
    return rows + [(x + [eos], x + [eos]) for x in random_sequences(tokenizer, copies * n_texts, seed)]


def causal_lm_loss(language_model, rows: list, pad_token_id: int) -> torch.Tensor:
    ids, mask, labels = llm_batch(rows, pad_token_id)
    logits = language_model(input_ids=ids, attention_mask=mask, return_dict=True).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100)


def seq2seq_loss(language_model, rows: list, pad_token_id: int) -> torch.Tensor:
    ids, mask, _ = padded_rows([s for s, _ in rows], [s for s, _ in rows], pad_token_id)
    _, _, labels = padded_rows([t for _, t in rows], [t for _, t in rows], pad_token_id)
    return language_model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=True).loss


# per LLM family (text_config.model_type): the rows it pre-trains on and their loss
PRETRAINING = {"opt": (llm_rows, causal_lm_loss), "t5": (seq2seq_rows, seq2seq_loss)}


def pretrain_llm(language_model, tokenizer, cfg: TrainConfig, n_texts: int = 20000, seed: int = 0,
                 state_file=None):
    """Train the LLM in place as a language model of the captions, and of answers and paraphrases that read a
    caption before them: OPT on `llm_rows` (next-token loss on the continuation), T5 on `seq2seq_rows` (the
    caption in the encoder, the continuation generated)."""
    make_rows, loss = PRETRAINING[language_model.config.model_type]
    rows = make_rows(tokenizer, n_texts, seed)
    language_model.train()

    def objective(step, generator):
        rng = np.random.default_rng([seed, step])
        batch = [rows[int(i)] for i in rng.integers(0, len(rows), cfg.batch_size)]
        return {"loss": loss(language_model, batch, tokenizer.pad_token_id)}

    fit("llm", language_model, [p for p in language_model.parameters() if p.requires_grad], objective, cfg,
        state_file)
    return language_model.eval()
