"""Runtime behaviour: batching, image input types, generation options, CLI."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from export.parity import probe_images


@pytest.fixture(scope="module")
def images(checkpoint):
    return probe_images(checkpoint.config.vision_config.image_size, count=3, seed=21)


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}, {"repetition_penalty": 1.3, "min_new_tokens": 4}])
def test_batch_equals_one_by_one(pipeline, images, options):
    prompts = ["a photo of", None, "Question: what shape is in the image? Answer:"]
    batched = pipeline.generate_ids(images, prompt=prompts, max_new_tokens=10, **options)
    single = [pipeline.generate_ids([im], prompt=[p], max_new_tokens=10, **options)[0]
              for im, p in zip(images, prompts)]
    assert batched == single


def test_image_input_types_agree(pipeline, tmp_path, images):
    im = images[0]
    im.save(tmp_path / "x.png")
    as_path = pipeline.caption(str(tmp_path / "x.png"), max_new_tokens=8)
    assert as_path == pipeline.caption(im, max_new_tokens=8)
    assert as_path == pipeline.caption(np.asarray(im), max_new_tokens=8)
    assert as_path == pipeline.caption(tmp_path / "x.png", max_new_tokens=8)


def test_max_and_min_new_tokens(pipeline, images):
    eos = pipeline.manifest.llm.eos_token_id
    for ids in pipeline.generate_ids(images, max_new_tokens=7, min_new_tokens=7):
        assert len(ids) == 7 and eos not in ids[:7]
    assert all(len(ids) <= 3 for ids in pipeline.generate_ids(images, max_new_tokens=3))


def test_sampling_is_seeded(pipeline, images):
    opts = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=12)
    a = pipeline.generate_ids(images, seed=7, **opts)
    assert a == pipeline.generate_ids(images, seed=7, **opts)
    assert a != pipeline.generate_ids(images, seed=8, **opts)
    greedy = pipeline.generate_ids(images, max_new_tokens=12)
    assert pipeline.generate_ids(images, do_sample=True, top_k=1, seed=3, max_new_tokens=12) == greedy


def test_caption_returns_text(pipeline, images, checkpoint):
    texts = pipeline.caption(images, max_new_tokens=6)
    ids = pipeline.generate_ids(images, max_new_tokens=6)
    assert texts == [checkpoint.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]


def test_runtime_cli_captions(tiny_engine, tmp_path):
    _, engine = tiny_engine
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "blue.png")
    proc = subprocess.run(
        [sys.executable, "-m", "runtime", "caption", "--engines", str(engine), "--max-new-tokens", "4",
         str(tmp_path / "blue.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(tmp_path / "blue.png") + "\t")
