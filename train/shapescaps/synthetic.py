"""ShapesCaps, a synthetic captioned-shapes data set (the demo's training and held-out data).

Torch-free (numpy + pillow only), so tokenizers, previews and metrics work without the
training stack. Preview a few samples, or write them as a user's data set on disk:

    python -m train.shapescaps.synthetic --preview previews/ --n 8                     # PNGs + captions.txt
    python -m train.shapescaps.synthetic --preview previews/ --split val --image-size 64
    python -m train.shapescaps.synthetic --write data/shapes --n 2000 --split train --image-size 64
                                                                                       # as a user's data on disk

    >>> from train.shapescaps.synthetic import ShapesCaps, caption_correct, vqa_correct
    >>> ds = ShapesCaps("train", n=1000, image_size=224, seed=0)
    >>> s = ds[0]                       # Sample: image, shapes, captions, qa, index
    >>> all(caption_correct(c, s) for c in s.captions)
    True

ShapesCaps draws one or two flat shapes on a light, slightly noisy background. Each
sample is a pure function of (split, seed, index): the same triple always gives the same
image bytes and texts, and train and val come from disjoint random streams, so the
held-out split is fixed. Captions name every shape's colour, shape and position (for two
shapes, their relation: "a red circle to the left of a blue square"); questions have one-word
answers and are only asked when the image answers them unambiguously.

Vocabulary (see the constants below): colours red green blue yellow purple orange; shapes
circle square triangle; sizes small large; one shape sits left/right/top/bottom/center; two
shapes sit side by side (left/right: "to the left of", "to the right of") or one above the
other (top/bottom: "above", "below").
"""
import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from train.training.datasets import qa_prompt

# ----------------------------------------------------------------------------- vocabulary

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 205, 40),
    "purple": (140, 60, 190),
    "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")  # where a lone shape sits
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))  # positions of a pair, first one left/top
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# relation phrase keyed by the position of the shape it describes relative to the other one
RELATIONS = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
PLACES = {  # phrases placing a lone shape; each contains its position word
    "left": ("on the left", "on the left side", "at the left of the image"),
    "right": ("on the right", "on the right side", "at the right of the image"),
    "top": ("at the top", "at the top of the image"),
    "bottom": ("at the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the center of the image"),
}
ONE_SHAPE_TEMPLATES = (
    "{np} {place}",
    "there is {np} {place}",
    "a picture of {np} {place}",
    "{bare} {place}",  # no size word
    "an image with {np} {place}",
    "{place}, {np}",
)
TWO_SHAPE_TEMPLATES = (
    "{np1} {rel} {np2}",
    "there is {np1} {rel} {np2}",
    "a picture of {np1} {rel} {np2}",
    "{bare1} {rel} {bare2}",  # no size words
    "two shapes, {np1} {rel} {np2}",
)
CAPTIONS_PER_SAMPLE = 4
SPLITS = {"train": 0, "val": 1}

# ----------------------------------------------------------------------------- geometry
# All fractions of the image side. They keep every layout unambiguous: a lone shape's centre
# stays within JITTER of its anchor, a pair's centres are at least 0.40 apart along their axis
# (more than two large shapes' extents, so they never overlap) and drift little across it.

SIZE_RANGE = {"small": (0.075, 0.095), "large": (0.14, 0.165)}  # half-extent of the shape
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
JITTER = 0.04
PAIR_OFFSET = 0.23  # pair centres sit at 0.5 -/+ this along their axis
PAIR_JITTER = 0.03  # per shape, both axes
PAIR_DRIFT = 0.10  # shared shift of the pair across its axis
BACKGROUND = (228.0, 246.0)  # light grey level, then a small per-channel tint
TINT = 6.0
NOISE = 8  # per-pixel uniform noise amplitude, in 0..255 units


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its words, and where it was drawn (centre and half-extent in pixels)."""

    colour: str
    shape: str
    size: str
    position: str
    center: tuple[float, float] = (0.0, 0.0)
    radius: float = 0.0


@dataclass
class Sample:
    """One captioned image. `qa` holds (question, one-word answer) pairs; COCO samples have no shapes or qa."""

    image: Image.Image | None
    shapes: list[Shape]
    captions: list[str]
    qa: list[tuple[str, str]]
    index: int
    path: Path | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------- scenes


def _pick_kinds(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """(colour, shape, size) for `n` shapes; two shapes differ in colour or shape."""
    while True:
        kinds = [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(SIZES))) for _ in range(n)]
        if n == 1 or kinds[0][:2] != kinds[1][:2]:
            return kinds


def _lone_centre(rng: np.random.Generator, position: str) -> tuple[float, float]:
    x, y = ANCHORS[position]
    return x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER)


def _pair_centres(rng: np.random.Generator, horizontal: bool) -> list[tuple[float, float]]:
    """Centres of a pair, first one left (or top), as fractions of the image side."""
    drift = rng.uniform(-PAIR_DRIFT, PAIR_DRIFT)
    centres = []
    for along in (0.5 - PAIR_OFFSET, 0.5 + PAIR_OFFSET):
        a = along + rng.uniform(-PAIR_JITTER, PAIR_JITTER)
        b = 0.5 + drift + rng.uniform(-PAIR_JITTER, PAIR_JITTER)
        centres.append((a, b) if horizontal else (b, a))
    return centres


def make_scene(rng: np.random.Generator, image_size: int) -> list[Shape]:
    """Draw one or two shapes' attributes and placement (pixels) from `rng`."""
    n = 1 if rng.random() < 0.5 else 2
    kinds = _pick_kinds(rng, n)
    if n == 1:
        positions = [str(rng.choice(POSITIONS))]
        centres = [_lone_centre(rng, positions[0])]
    else:
        positions = list(PAIR_LAYOUTS[int(rng.integers(2))])
        centres = _pair_centres(rng, horizontal=positions[0] == "left")
    shapes = []
    for (colour, shape, size), position, (cx, cy) in zip(kinds, positions, centres):
        radius = rng.uniform(*SIZE_RANGE[size]) * image_size
        shapes.append(Shape(colour, shape, size, position, (cx * image_size, cy * image_size), radius))
    return shapes


# ----------------------------------------------------------------------------- rendering


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill=None) -> None:
    """Draw `s` in its colour (or in `fill`, e.g. a label for a segmentation map)."""
    (cx, cy), r = s.center, s.radius
    fill = COLOURS[s.colour] if fill is None else fill
    box = (cx - r, cy - r, cx + r, cy + r)
    if s.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif s.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle pointing up; its centre row is r wide, so the centre pixel is inside
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, nearly grey colour: a random level with a small per-channel tint."""
    level = rng.uniform(*BACKGROUND)
    return tuple(int(round(level + rng.uniform(-TINT, TINT))) for _ in range(3))


def label_map(shapes: list[Shape], image_size: int) -> np.ndarray:
    """[H, W] uint8: 0 on the background, k + 1 where shapes[k] was drawn (later shapes on top)."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    for k, s in enumerate(shapes):
        _draw_shape(draw, s, fill=k + 1)
    return np.asarray(canvas)


def render(shapes: list[Shape], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `shapes` on a light background and add a little per-pixel noise (RGB, square)."""
    image = Image.new("RGB", (image_size, image_size), _background(rng))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw_shape(draw, s)
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-NOISE, NOISE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(s: Shape, with_size: bool = True) -> str:
    """'a small red circle' ('an orange square' without the size)."""
    words = [s.size, s.colour, s.shape] if with_size else [s.colour, s.shape]
    return _with_article(" ".join(words))


def _one_shape_caption(template: str, s: Shape, rng: np.random.Generator) -> str:
    place = str(rng.choice(PLACES[s.position]))
    return template.format(np=noun_phrase(s), bare=noun_phrase(s, with_size=False), place=place)


def _two_shape_caption(template: str, shapes: list[Shape], rng: np.random.Generator) -> str:
    first, second = shapes if rng.random() < 0.5 else shapes[::-1]
    return template.format(
        np1=noun_phrase(first), np2=noun_phrase(second), rel=RELATIONS[first.position],
        bare1=noun_phrase(first, with_size=False), bare2=noun_phrase(second, with_size=False),
    )


MIRROR = {**OPPOSITE, "above": "below", "below": "above"}  # the position words and the vertical RELATIONS
_SIDE_WORD = re.compile(r"\b(" + "|".join(MIRROR) + r")\b")


def mirrored(caption: str) -> str | None:
    """The caption with its layout mirrored, or None when it names no side ('in the center'):
    'a red circle to the left of a blue square' -> '... to the right of ...'. A foil: it differs from a
    true caption only in where things are, so telling them apart needs the layout bound to each shape."""
    flipped = _SIDE_WORD.sub(lambda m: MIRROR[m.group(1)], caption)
    return flipped if flipped != caption else None


def make_captions(shapes: list[Shape], rng: np.random.Generator, k: int = CAPTIONS_PER_SAMPLE) -> list[str]:
    """`k` captions from distinct templates, each naming every shape's colour, shape and position."""
    templates = ONE_SHAPE_TEMPLATES if len(shapes) == 1 else TWO_SHAPE_TEMPLATES
    chosen = [templates[i] for i in rng.permutation(len(templates))[:k]]
    if len(shapes) == 1:
        return [_one_shape_caption(t, shapes[0], rng) for t in chosen]
    return [_two_shape_caption(t, shapes, rng) for t in chosen]


# ----------------------------------------------------------------------------- questions


def _colour_word(rng: np.random.Generator) -> str:
    """Both spellings, so prompts like the README's 'what color is the circle?' are in-distribution."""
    return "colour" if rng.random() < 0.5 else "color"


def _absent_kind(shapes: list[Shape], rng: np.random.Generator) -> tuple[str, str]:
    present = {(s.colour, s.shape) for s in shapes}
    absent = [(c, h) for c in COLOURS for h in SHAPES if (c, h) not in present]
    return absent[int(rng.integers(len(absent)))]


def _shape_questions(s: Shape, shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Questions about one shape of the image, phrased so only `s` fits them."""
    unique_shape = sum(o.shape == s.shape for o in shapes) == 1
    unique_colour = sum(o.colour == s.colour for o in shapes) == 1
    place = PLACES[s.position][0]
    qa = [(f"where is the {s.colour} {s.shape}?", s.position),
          (f"what size is the {s.colour} {s.shape}?", s.size)]
    if unique_shape:
        qa += [(f"what {_colour_word(rng)} is the {s.shape}?", s.colour), (f"where is the {s.shape}?", s.position)]
    else:
        qa.append((f"what {_colour_word(rng)} is the {s.shape} {place}?", s.colour))
    if unique_colour:
        qa.append((f"what shape is the {s.colour} object?", s.shape))
    if len(shapes) == 2:
        qa.append((f"what shape is the object {place}?", s.shape))
    return qa


def _relation_questions(shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, str]]:
    """'what shape is to the left of the blue square?' for each of a pair."""
    qa = []
    for s, other in (shapes, shapes[::-1]):
        rel, ref = RELATIONS[s.position], f"{other.colour} {other.shape}"
        qa.append((f"what shape is {rel} the {ref}?", s.shape))
        qa.append((f"what {_colour_word(rng)} is the shape {rel} the {ref}?", s.colour))
    return qa


def make_questions(shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, one-word answer) pairs that the image answers unambiguously."""
    qa = [("how many shapes are there?", "one" if len(shapes) == 1 else "two")]
    for s in shapes:
        qa += _shape_questions(s, shapes, rng)
    if len(shapes) == 2:
        qa += _relation_questions(shapes, rng)
    s = shapes[int(rng.integers(len(shapes)))]
    colour, shape = _absent_kind(shapes, rng)
    qa.append((f"is there {_with_article(s.colour + ' ' + s.shape)}?", "yes"))
    qa.append((f"is there {_with_article(colour + ' ' + shape)}?", "no"))
    return qa


# ----------------------------------------------------------------------------- data set


class ShapesCaps:
    """Deterministic synthetic captioned shapes: `ShapesCaps("train", n=10000)[i]` is a `Sample`.

    Nothing is cached: each item is regenerated from (split, seed, index) in a few milliseconds.
    """

    def __init__(self, split: str = "train", n: int = 1000, image_size: int = 224, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
        if n < 0 or image_size < 16 or seed < 0:
            raise ValueError("need n >= 0, image_size >= 16 and seed >= 0 "
                             f"(got n={n}, image_size={image_size}, seed={seed})")
        self.split, self.n, self.image_size, self.seed = split, n, image_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index)

    def __iter__(self) -> Iterator[Sample]:
        return (self.sample(i) for i in range(self.n))

    def __repr__(self) -> str:
        return f"ShapesCaps(split={self.split!r}, n={self.n}, image_size={self.image_size}, seed={self.seed})"

    def _rngs(self, index: int) -> list[np.random.Generator]:
        """Independent streams for scene, texts and pixels: texts never depend on rendering."""
        seq = np.random.SeedSequence([self.seed, SPLITS[self.split], index])
        return [np.random.default_rng(child) for child in seq.spawn(3)]

    def sample(self, index: int, render_image: bool = True) -> Sample:
        """Item `index`; with `render_image=False` the image is None (texts only, much cheaper)."""
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self!r}")
        index %= self.n
        scene_rng, text_rng, pixel_rng = self._rngs(index)
        shapes = make_scene(scene_rng, self.image_size)
        captions = make_captions(shapes, text_rng)
        qa = make_questions(shapes, text_rng)
        image = render(shapes, self.image_size, pixel_rng) if render_image else None
        return Sample(image, shapes, captions, qa, index)


def text_corpus(n_train: int = 10000, seed: int = 0) -> Iterator[str]:
    """Every caption and QA string of the first `n_train` training samples (to train tokenizers on).

    Questions come in the prompt format with their answer: 'Question: ... Answer: red'.
    """
    ds = ShapesCaps("train", n=n_train, seed=seed)
    for i in range(n_train):
        s = ds.sample(i, render_image=False)
        yield from s.captions
        for question, answer in s.qa:
            yield f"{qa_prompt(question)} {answer}"


def context_corpus(n_train: int = 10000, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(context, continuation) pairs that can only be continued by reading the context: a caption of a scene
    then another caption of it, or a question about it and its answer ('a red circle on the left',
    'Question: what colour is the circle? Answer: red').

    A language model trained on these learns to look back and re-express what the context says, which is
    how BLIP-2's frozen LLM reads the soft prompt (a real pretrained LLM brings this ability; a small one
    trained on captions alone has no reason to learn it). `train.shapescaps.backbones.pretrain_llm` lays them out as
    stage 2 lays out the soft prompt and the text: context, BOS, continuation. Every caption of a sample is
    followed by the next one and once by itself (a verbatim copy: the plainest lesson in reading back in
    order), and every question is asked, so each attribute word (colour, shape, size, position) has to be
    read back from the context somewhere."""
    ds = ShapesCaps("train", n=n_train, seed=seed)
    for i in range(n_train):
        s = ds.sample(i, render_image=False)
        captions = s.captions
        for k, caption in enumerate(captions):
            yield caption, captions[(k + 1) % len(captions)]
        yield captions[0], captions[0]
        for k, (question, answer) in enumerate(s.qa):
            yield captions[k % len(captions)], f"{qa_prompt(question)} {answer}"


# ----------------------------------------------------------------------------- metrics

_WORD = re.compile(r"[a-z]+")
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center",
                   "centre": "center", "middle": "center", "above": "top", "below": "bottom"}


def _noun_phrases(words: list[str]) -> list[tuple[str | None, str, int, int]]:
    """(colour or None, shape, first word index, index after the shape word) for each shape word."""
    phrases, colour, start = [], None, None
    for i, w in enumerate(words):
        if w in COLOURS:
            colour, start = w, i
        elif w in SHAPES:
            phrases.append((colour, w, i if start is None else start, i + 1))
            colour, start = None, None
    return phrases


def _single_position(words: list[str]) -> str | None:
    """The one position word of a lone-shape caption, None if there is none or they conflict."""
    found = {_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS}
    return found.pop() if len(found) == 1 else None


def _relation_positions(between: list[str]) -> tuple[str | None, str | None]:
    """Positions of (first, second) shape from the relation words between their noun phrases."""
    found = {_POSITION_WORDS[w] for w in between if w in _POSITION_WORDS} - {"center"}
    if len(found) != 1:
        return None, None
    first = found.pop()
    return first, OPPOSITE[first]


def caption_attributes(text: str) -> list[tuple[str | None, str, str | None]]:
    """(colour, shape, position) of each shape a caption names, in caption order.

    A lone shape takes the caption's position word; two shapes take the relation between
    them ("a red circle to the left of a blue square" -> red circle left, blue square right).
    Missing or contradictory words give None.
    """
    words = _WORD.findall(text.lower())
    phrases = _noun_phrases(words)
    if len(phrases) == 1:
        colour, shape, _, _ = phrases[0]
        return [(colour, shape, _single_position(words))]
    if len(phrases) == 2:
        (c1, h1, _, end1), (c2, h2, start2, _) = phrases
        p1, p2 = _relation_positions(words[end1:start2])
        return [(c1, h1, p1), (c2, h2, p2)]
    return [(colour, shape, None) for colour, shape, _, _ in phrases]


def caption_correct(pred: str, sample: Sample) -> bool:
    """True when `pred` names exactly the sample's shapes with the right colour, shape and position.

    Colours must be bound to the right shapes and the relation must be right; a colour, shape
    or position word that fits none of the shapes makes the caption wrong. The mean over a
    split is the "caption accuracy" metric.
    """
    expected = [(s.colour, s.shape, s.position) for s in sample.shapes]
    if Counter(caption_attributes(pred)) != Counter(expected):
        return False
    words = set(_WORD.findall(pred.lower()))
    positions = {_POSITION_WORDS[w] for w in words if w in _POSITION_WORDS}
    return (words & set(COLOURS) <= {s.colour for s in sample.shapes}
            and words & set(SHAPES) <= {s.shape for s in sample.shapes}
            and positions <= {s.position for s in sample.shapes})


_ANSWER_ALIASES = {"1": "one", "2": "two", "centre": "center", "middle": "center", "grey": "gray"}
_ARTICLES = {"a", "an", "the"}


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation and articles dropped, '2' -> 'two', 'centre' -> 'center'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(_ANSWER_ALIASES.get(w, w) for w in words if w not in _ARTICLES)


def vqa_correct(pred: str, answer: str) -> bool:
    """Normalised exact match of a predicted answer against the reference answer."""
    return normalise_answer(pred) == normalise_answer(answer)


# ----------------------------------------------------------------------------- CLI


def write_preview(out_dir: str | Path, n: int = 8, split: str = "train", seed: int = 0, image_size: int = 224) -> Path:
    """Save the first `n` samples of a split as PNGs plus captions.txt listing their texts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in ShapesCaps(split, n=n, image_size=image_size, seed=seed):
        name = f"{split}_{s.index:04d}.png"
        s.image.save(out / name)
        lines.append(name)
        lines += [f"  caption: {c}" for c in s.captions]
        lines += [f"  Q: {q}  A: {a}" for q, a in s.qa]
    (out / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def write_files(out_dir: str | Path, n: int, split: str = "train", seed: int = 0, image_size: int = 64) -> Path:
    """ShapesCaps as a user's data on disk: images/<split>_NNNNN.png, captions_<split>.json (COCO captions) and
    <split>.jsonl (caption rows, then one VQA row per question with its answer ten times, as VQAv2 has ten)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, rows = [], [], []
    for s in ShapesCaps(split, n=n, image_size=image_size, seed=seed):
        name = f"{split}_{s.index:05d}.png"
        s.image.save(out / "images" / name)
        images.append({"id": s.index, "file_name": name})
        for c in s.captions:
            annotations.append({"id": len(annotations), "image_id": s.index, "caption": c})
            rows.append({"image": f"images/{name}", "caption": c})
        rows += [{"image": f"images/{name}", "question": q, "answers": [a] * 10} for q, a in s.qa]
    (out / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.shapescaps.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preview", metavar="DIR", help="write the first --n ShapesCaps samples as PNGs + captions.txt")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--split", default="train", choices=sorted(SPLITS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--write", metavar="DIR", help="write --n samples of --split as files: images/, "
                    "captions_<split>.json (COCO captions) and <split>.jsonl (captions and VQA rows)")
    args = ap.parse_args(argv)
    if not (args.preview or args.write):
        ap.error("nothing to do: pass --preview DIR and/or --write DIR")
    if args.write:
        out = write_files(args.write, args.n, args.split, args.seed, args.image_size)
        print(f"wrote {args.n} {args.split} samples to {out}")
    if args.preview:
        out = write_preview(args.preview, args.n, args.split, args.seed, args.image_size)
        print(f"wrote {args.n} samples to {out}")


if __name__ == "__main__":
    main()
