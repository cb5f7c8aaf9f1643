"""Tests of train/shapescaps/synthetic.py: ShapesCaps determinism, splits, captions/QA correctness, rendering, metrics,
COCO loader."""
import json
import re
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from train.training.datasets import DataError, Example, open_dataset
from train.shapescaps.synthetic import (
    COLOURS,
    OPPOSITE,
    SHAPES,
    Shape,
    ShapesCaps,
    caption_attributes,
    caption_correct,
    mirrored,
    normalise_answer,
    text_corpus,
    vqa_correct,
)

N_CHECK = 500


@pytest.fixture(scope="module")
def texts():
    """Text-only samples (no rendering) of the training split."""
    ds = ShapesCaps("train", n=1000, seed=0)
    return [ds.sample(i, render_image=False) for i in range(len(ds))]


def image_bytes(sample):
    return sample.image.tobytes()


def attrs(sample):
    return Counter((s.colour, s.shape, s.position) for s in sample.shapes)


# ----------------------------------------------------------------------------- determinism and splits


def test_same_index_gives_identical_sample():
    a, b = ShapesCaps("train", n=50, seed=3), ShapesCaps("train", n=50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert image_bytes(x) == image_bytes(y)
        assert (x.captions, x.qa, x.shapes) == (y.captions, y.qa, y.shapes)
    assert image_bytes(a[-1]) == image_bytes(a[49])


def test_different_index_or_seed_gives_different_sample():
    ds = ShapesCaps("train", n=50)
    assert image_bytes(ds[0]) != image_bytes(ds[1])
    assert image_bytes(ds[0]) != image_bytes(ShapesCaps("train", n=50, seed=1)[0])


def test_texts_do_not_depend_on_rendering_or_image_size():
    big, small = ShapesCaps("val", n=20, image_size=224), ShapesCaps("val", n=20, image_size=64)
    for i in range(20):
        a, b, c = big[i], big.sample(i, render_image=False), small[i]
        assert b.image is None and small[i].image.size == (64, 64)
        assert a.captions == b.captions == c.captions and a.qa == b.qa == c.qa


def test_train_and_val_are_disjoint():
    train = {image_bytes(s) for s in ShapesCaps("train", n=200, image_size=64)}
    val = {image_bytes(s) for s in ShapesCaps("val", n=200, image_size=64)}
    assert len(train) == len(val) == 200
    assert not train & val
    t_caps = [ShapesCaps("train", n=200).sample(i, render_image=False).captions for i in range(200)]
    v_caps = [ShapesCaps("val", n=200).sample(i, render_image=False).captions for i in range(200)]
    assert t_caps != v_caps


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        ShapesCaps("test")
    with pytest.raises(IndexError):
        ShapesCaps("train", n=3)[3]
    assert len(ShapesCaps("train", n=3)) == 3 and len(list(ShapesCaps("train", n=3))) == 3


# ----------------------------------------------------------------------------- scenes and rendering


def test_scene_rules(texts):
    for i, s in enumerate(texts):
        assert len(s.shapes) in (1, 2) and s.index == i
        assert all(x.colour in COLOURS and x.shape in SHAPES and x.size in ("small", "large") for x in s.shapes)
        if len(s.shapes) == 2:
            a, b = s.shapes
            assert (a.colour, a.shape) != (b.colour, b.shape), "two shapes must differ in colour or shape"
            assert b.position == OPPOSITE[a.position]
            gap = max(abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1]))
            assert gap > a.radius + b.radius, "shapes overlap"


def test_positions_match_geometry(texts):
    """Every shape sits where its words say: relative to the image side, with a clear margin."""
    for s in texts:
        for x in s.shapes:
            cx, cy = (v / 224 for v in x.center)
            r = x.radius / 224
            assert r <= cx <= 1 - r and r <= cy <= 1 - r, "shape leaves the image"
            expect = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65,
                      "center": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}
            assert expect[x.position], (x, s.index)
        if len(s.shapes) == 2:  # the relation is along one axis only
            a, b = s.shapes
            dx, dy = abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])
            assert (dx > 3 * dy) if a.position == "left" else (dy > 3 * dx)
        small = [x.radius for x in s.shapes if x.size == "small"]
        large = [x.radius for x in s.shapes if x.size == "large"]
        assert all(r < 0.1 * 224 for r in small) and all(r > 0.13 * 224 for r in large)


@pytest.mark.parametrize("image_size", [224, 64])
def test_images_render_the_shapes(image_size):
    ds = ShapesCaps("train", n=100, image_size=image_size, seed=5)
    for s in ds:
        assert s.image.mode == "RGB" and s.image.size == (image_size, image_size)
        pixels = np.asarray(s.image, dtype=np.float64)
        for x in s.shapes:
            cx, cy = (int(round(v)) for v in x.center)
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - COLOURS[x.colour]).max() < 12, (s.index, x, patch)
        corner = pixels[:4, :4].reshape(-1, 3).mean(0)
        assert corner.min() > 210, "background must be light"


def test_distribution_is_balanced(texts):
    shapes = [x for s in texts for x in s.shapes]
    for counts, values in ((Counter(x.colour for x in shapes), COLOURS), (Counter(x.shape for x in shapes), SHAPES)):
        expected = len(shapes) / len(values)
        assert set(counts) == set(values)
        assert all(0.8 * expected < counts[v] < 1.2 * expected for v in values), counts
    n_two = sum(len(s.shapes) == 2 for s in texts)
    assert 400 < n_two < 600
    assert set(Counter(x.position for x in shapes)) == {"left", "right", "top", "bottom", "center"}


# ----------------------------------------------------------------------------- captions


def test_captions_parse_to_the_sample_shapes(texts):
    for s in texts[:N_CHECK]:
        assert 3 <= len(s.captions) <= 5 and len(set(s.captions)) == len(s.captions)
        for c in s.captions:
            assert c == c.lower() and not c.endswith(".")
            assert Counter(caption_attributes(c)) == attrs(s), (c, s.shapes)
            for x in s.shapes:
                assert x.colour in c and x.shape in c


def test_captions_mostly_name_sizes(texts):
    caps = [(c, s) for s in texts[:N_CHECK] for c in s.captions]
    with_size = sum(all(x.size in c.split() for x in s.shapes) for c, s in caps)
    assert with_size > 0.6 * len(caps)


def test_caption_attributes_examples():
    assert caption_attributes("a small red circle on the left") == [("red", "circle", "left")]
    assert caption_attributes("there is a red circle at the left of the image") == [("red", "circle", "left")]
    assert caption_attributes("a red circle to the left of a blue square") == [("red", "circle", "left"),
                                                                               ("blue", "square", "right")]
    assert caption_attributes("a blue square above an orange triangle") == [("blue", "square", "top"),
                                                                            ("orange", "triangle", "bottom")]
    assert caption_attributes("a red circle on the left at the top") == [("red", "circle", None)]
    assert caption_attributes("a circle") == [(None, "circle", None)]
    assert caption_attributes("nothing here") == []


def test_caption_correct_accepts_own_captions(texts):
    for s in texts[:N_CHECK]:
        assert all(caption_correct(c, s) for c in s.captions), s.captions


def _swap_word(caption, vocab, present):
    """Replace the first word of `vocab` in `caption` by one that is in none of the sample's shapes."""
    old = next(w for w in re.findall(r"[a-z]+", caption) if w in vocab)
    return re.sub(rf"\b{old}\b", next(v for v in vocab if v not in present), caption, count=1)


def _flip_relation(caption):
    table = {"left": "right", "right": "left", "above": "below", "below": "above",
             "top": "bottom", "bottom": "top", "center": "left"}
    return re.sub(r"[a-z]+", lambda m: table.get(m.group(0), m.group(0)), caption)


def test_mirrored_captions_are_foils(texts):
    """Stage 1's foils: the layout mirrored, so false for the image, and everything else unchanged."""
    kinds = Counter()
    for s in texts[:300]:
        for c in s.captions:
            foil = mirrored(c)
            if all(sh.position == "center" for sh in s.shapes):
                assert foil is None, c
                continue
            assert foil is not None and not caption_correct(foil, s), (c, foil)
            assert mirrored(foil) == c and len(foil.split()) == len(c.split())
            kinds[len(s.shapes)] += 1
    assert kinds[1] > 50 and kinds[2] > 50
    assert mirrored("a red circle to the left of a blue square") == "a red circle to the right of a blue square"
    assert mirrored("at the top, a red circle") == "at the bottom, a red circle"


def _swap_colours(caption, a, b):
    return re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(0) == a else a, caption)


def test_caption_correct_rejects_perturbed_captions(texts):
    seen = Counter()
    for s in texts[:N_CHECK]:
        colours, shapes = {x.colour for x in s.shapes}, {x.shape for x in s.shapes}
        wrong_colour = next(c for c in COLOURS if c not in colours)
        for c in s.captions:
            assert not caption_correct(_swap_word(c, list(COLOURS), colours), s)
            assert not caption_correct(_flip_relation(c), s)
            assert not caption_correct(f"{c} and a {wrong_colour} one", s)
            if len(shapes) < len(SHAPES):
                assert not caption_correct(_swap_word(c, list(SHAPES), shapes), s)
            if len(s.shapes) == 2 and len(colours) == 2:
                assert not caption_correct(_swap_colours(c, *colours), s), c
                seen["bindings"] += 1
            if len(s.shapes) == 2:
                first = c.split(" to the ")[0].split(" above ")[0].split(" below ")[0]
                assert not caption_correct(first, s), "a caption naming one of two shapes is wrong"
    assert seen["bindings"] > 100


def test_caption_correct_examples():
    s = ShapesCaps("train", n=1).sample(0, render_image=False)
    s.shapes = [Shape("red", "circle", "small", "left"), Shape("blue", "square", "large", "right")]
    assert caption_correct("a red circle to the left of a blue square", s)
    assert caption_correct("A large blue square to the right of a small red circle.", s)
    assert not caption_correct("a blue circle to the left of a red square", s)
    assert not caption_correct("a blue square to the left of a red circle", s)
    assert not caption_correct("a red circle to the left of a blue square at the top", s)
    assert not caption_correct("a red circle to the left of a blue square and a red triangle", s)
    assert not caption_correct("", s)


# ----------------------------------------------------------------------------- questions


def _answer(question, shapes):
    """Answer a generated question from the shape list alone, insisting it picks out one shape."""
    def one(pred):
        hits = [x for x in shapes if pred(x)]
        assert len(hits) == 1, (question, shapes)
        return hits[0]

    place = r"(?:on the|at the|in the) (\w+)"
    rules = [
        (r"how many shapes are there\?", lambda: {1: "one", 2: "two"}[len(shapes)]),
        (r"is there an? (\w+) (\w+)\?",
         lambda c, h: "yes" if any((x.colour, x.shape) == (c, h) for x in shapes) else "no"),
        (r"where is the (\w+) (\w+)\?", lambda c, h: one(lambda x: (x.colour, x.shape) == (c, h)).position),
        (r"where is the (\w+)\?", lambda h: one(lambda x: x.shape == h).position),
        (r"what size is the (\w+) (\w+)\?", lambda c, h: one(lambda x: (x.colour, x.shape) == (c, h)).size),
        (rf"what colou?r is the (\w+) {place}\?", lambda h, p: one(lambda x: (x.shape, x.position) == (h, p)).colour),
        (r"what colou?r is the (\w+)\?", lambda h: one(lambda x: x.shape == h).colour),
        (r"what shape is the (\w+) object\?", lambda c: one(lambda x: x.colour == c).shape),
        (rf"what shape is the object {place}\?", lambda p: one(lambda x: x.position == p).shape),
        (r"what shape is (?:to the )?(\w+)(?: of)? the (\w+) (\w+)\?", lambda r, c, h: _related(one, r, c, h).shape),
        (r"what colou?r is the shape (?:to the )?(\w+)(?: of)? the (\w+) (\w+)\?",
         lambda r, c, h: _related(one, r, c, h).colour),
    ]
    for pattern, rule in rules:
        m = re.fullmatch(pattern, question)
        if m:
            return rule(*m.groups())
    raise AssertionError(f"unexpected question {question!r}")


def _related(one, relation, colour, shape):
    ref = one(lambda x: (x.colour, x.shape) == (colour, shape))
    position = {"left": "left", "right": "right", "above": "top", "below": "bottom"}[relation]
    assert ref.position == OPPOSITE[position]
    return one(lambda x: x is not ref and x.position == position)


def test_answers_follow_from_the_shapes(texts):
    kinds = Counter()
    for s in texts[:N_CHECK]:
        assert len({q for q, _ in s.qa}) == len(s.qa), "duplicate question"
        for q, a in s.qa:
            assert len(a.split()) == 1 and q.endswith("?") and q == q.lower()
            assert _answer(q, s.shapes) == a, (q, a, s.shapes)
            kinds[q.split()[1]] += 1
    assert {"many", "there", "is", "size", "colour", "color", "shape"} <= set(kinds)


def test_vqa_correct():
    assert vqa_correct("Red.", "red") and vqa_correct(" the circle ", "circle") and vqa_correct("2", "two")
    assert vqa_correct("centre", "center")
    assert not vqa_correct("blue", "red") and not vqa_correct("red circle", "red") and not vqa_correct("", "red")
    assert normalise_answer("An Orange!") == "orange"


def test_text_corpus_covers_the_vocabulary():
    corpus = list(text_corpus(200, seed=0))
    ds = ShapesCaps("train", n=200, seed=0)
    expected = sum(len(s.captions) + len(s.qa) for s in (ds.sample(i, render_image=False) for i in range(200)))
    assert len(corpus) == expected
    words = {w for line in corpus for w in re.findall(r"[a-z]+", line.lower())}
    assert set(COLOURS) | set(SHAPES) | {"small", "large", "left", "right", "top", "bottom", "center", "above",
                                         "below"} <= words
    assert any(line.startswith("Question: ") and " Answer: " in line for line in corpus)
    assert corpus == list(text_corpus(200, seed=0))


def test_context_corpus_continues_from_what_came_before():
    from train.shapescaps.synthetic import caption_correct, context_corpus

    samples = [ShapesCaps("train", n=20, seed=0).sample(j, render_image=False) for j in range(20)]
    corpus = list(context_corpus(20, seed=0))
    assert corpus == list(context_corpus(20, seed=0))
    assert len(corpus) == sum(len(s.captions) + 1 + len(s.qa) for s in samples)
    at = 0
    for sample in samples:
        n_caps = len(sample.captions)
        pairs, at = corpus[at: at + n_caps + 1 + len(sample.qa)], at + n_caps + 1 + len(sample.qa)
        for (context, paraphrase), caption in zip(pairs, sample.captions):
            assert context == caption and paraphrase != caption and caption_correct(paraphrase, sample)
        assert pairs[n_caps] == (sample.captions[0], sample.captions[0])  # one verbatim copy
        for (context, text), (question, answer) in zip(pairs[n_caps + 1:], sample.qa):  # every question is asked
            assert context in sample.captions and text == f"Question: {question} Answer: {answer}"


def test_data_is_torch_free_and_preview_cli(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from train.shapescaps.synthetic import main
        main(["--preview", {str(tmp_path)!r}, "--n", "3", "--image-size", "32"])
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "train_0000.png", "train_0001.png",
                                                          "train_0002.png"]
    text = (tmp_path / "captions.txt").read_text()
    assert text.count("caption: ") == 3 * 4 and "Q: how many shapes are there?" in text
    assert Image.open(tmp_path / "train_0001.png").size == (32, 32)


# ----------------------------------------------------------------------------- COCO


@pytest.fixture()
def coco(tmp_path):
    """A tiny COCO captions folder: annotations json and two PNGs."""
    images = tmp_path / "val2017"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "000000000001.png")
    Image.new("L", (20, 20), 128).save(images / "000000000002.png")
    doc = {
        "images": [{"id": 1, "file_name": "000000000001.png"}, {"id": 2, "file_name": "000000000002.png"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A red  picture.\n"},
            {"image_id": 2, "id": 11, "caption": "a grey square"},
            {"image_id": 1, "id": 12, "caption": "something red"},
        ],
    }
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps(doc))
    return ann, images, doc


def test_coco_loads(coco):
    """One example per image, its captions in file order with their whitespace collapsed."""
    ann, images, _ = coco
    data = open_dataset(ann, images=images)
    assert data.examples == [Example(str(images / "000000000001.png"), ("A red picture.", "something red")),
                             Example(str(images / "000000000002.png"), ("a grey square",))]
    assert data.load(0).mode == "RGB" and data.load(0).size == (40, 30) and data.load(1).mode == "RGB"


def _rewrite(ann, doc):
    ann.write_text(json.dumps(doc))


@pytest.mark.parametrize("break_it, message", [
    (lambda ann, doc: ann.unlink(), r"data not found: .*captions_val2017.json"),
    (lambda ann, doc: ann.write_text('{"images": ['), r"not valid JSON"),
    (lambda ann, doc: ann.write_text("[1, 2]"), r"holds a list, not an object"),
    (lambda ann, doc: _rewrite(ann, {"images": doc["images"]}), r"missing the key 'annotations'"),
    (lambda ann, doc: _rewrite(ann, {"annotations": doc["annotations"]}), r"missing the key 'images'"),
    (lambda ann, doc: _rewrite(ann, {**doc, "images": [{"id": 1}]}), r"images\[0\] .* missing 'file_name'"),
    (lambda ann, doc: _rewrite(ann, {**doc, "annotations": [{"image_id": 1, "id": 3}]}),
     r"annotations\[0\] .* missing 'caption'"),
    (lambda ann, doc: _rewrite(ann, {**doc, "annotations": []}), r"has no annotations"),
    (lambda ann, doc: _rewrite(ann, {**doc, "annotations": doc["annotations"] + [{"image_id": 99, "caption": "x"}]}),
     r"1 annotations .* image ids missing from 'images' \(first: \[99\]\)"),
    (lambda ann, doc: (ann.parent / "val2017" / "000000000002.png").unlink(), r"000000000002.png"),
])
def test_coco_errors(coco, break_it, message):
    ann, images, doc = coco
    break_it(ann, doc)
    with pytest.raises(DataError, match=message):
        open_dataset(ann, images=images)


def test_coco_missing_image_folder(coco, tmp_path):
    ann, images, _ = coco
    with pytest.raises(DataError, match="--images .* is not a folder"):
        open_dataset(ann, images=tmp_path / "train2017")
    assert issubclass(DataError, ValueError)
