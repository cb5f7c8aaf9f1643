"""Bad input gets a clear error naming the problem and the fix, and never breaks a reused pipeline."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from runtime import Blip2Pipeline
from runtime.errors import EngineFolderError, ImageInputError, PromptError


@pytest.fixture()
def engine_copy(tiny_engine, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(tiny_engine[1], dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(EngineFolderError, match="not found.*export.build"):
        Blip2Pipeline.from_dir(tmp_path / "nope")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(EngineFolderError, match="manifest.json is missing"):
        Blip2Pipeline.from_dir(tmp_path)


def test_corrupt_manifest(engine_copy):
    (engine_copy / "manifest.json").write_text("{not json")
    with pytest.raises(EngineFolderError, match="not valid JSON"):
        Blip2Pipeline.from_dir(engine_copy)


def test_other_format_version(engine_copy):
    m = json.loads((engine_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineFolderError, match="format_version 99.*rebuild"):
        Blip2Pipeline.from_dir(engine_copy)


def test_missing_graph_file(engine_copy):
    (engine_copy / "vision.onnx").unlink()
    with pytest.raises(EngineFolderError, match="incomplete: missing vision.onnx"):
        Blip2Pipeline.from_dir(engine_copy)


def test_corrupt_graph_file(engine_copy):
    (engine_copy / "vision.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(EngineFolderError, match="could not load .*vision.onnx.*rebuild"):
        Blip2Pipeline.from_dir(engine_copy)


def test_unreadable_images(pipeline, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageInputError, match="no such file"):
        pipeline.caption(tmp_path / "missing.png")
    with pytest.raises(ImageInputError, match="notes.txt"):
        pipeline.caption(tmp_path / "notes.txt")
    with pytest.raises(ImageInputError):
        pipeline.caption(np.zeros((4, 4, 3), dtype=np.float32))
    assert len(pipeline.caption(np.zeros((9, 9, 3), dtype=np.uint8), max_new_tokens=3)) == 1  # still usable


def test_odd_image_modes_are_converted(pipeline, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "sixteen.png")
    out = pipeline.caption([tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "sixteen.png"], max_new_tokens=3)
    assert len(out) == 3


def test_prompt_errors_leave_pipeline_usable(pipeline):
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    before = pipeline.generate_ids(img, max_new_tokens=5)
    with pytest.raises(PromptError, match="prompt is empty.*prompt=None"):
        pipeline.generate(img, prompt="   ")
    with pytest.raises(PromptError, match="tokens long.*max-prompt-tokens"):
        pipeline.generate(img, prompt="word " * 500)
    with pytest.raises(PromptError, match="max_new_tokens=.*exceeds.*--max-new-tokens"):
        pipeline.generate(img, max_new_tokens=10_000)
    with pytest.raises(PromptError, match="2 images but 3 prompts"):
        pipeline.generate([img, img], prompt=["a", "b", "c"])
    with pytest.raises(PromptError, match="no images"):
        pipeline.caption([])
    with pytest.raises(PromptError, match="unknown generation option"):
        pipeline.caption(img, beams=3)
    with pytest.raises(PromptError, match="num_beams"):
        pipeline.caption(img, num_beams=0)
    assert pipeline.generate_ids(img, max_new_tokens=5) == before


def test_build_rejects_tensorrt_targets_without_tensorrt_and_bad_models(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.build", "--model", str(tmp_path), "--target", "trt-fp16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "needs TensorRT" in proc.stderr and "onnx-fp16" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "export.build", "--model", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "checkpoint folder not found" in proc.stderr
    assert not (ROOT / "engines" / "none").exists()


def test_failed_build_leaves_nothing(tiny_engine, tmp_path, monkeypatch):
    import export.build as b
    from export.parity import ParityError, Tolerance

    monkeypatch.setitem(b.TOLERANCES, "fp32", Tolerance(atol=0.0, rtol=0.0, why="impossible, for the test"))
    with pytest.raises(ParityError):
        b.build(tiny_engine[0], "onnx", tmp_path / "engines", say=lambda *_: None)
    leftovers = list((tmp_path / "engines").rglob("*"))
    assert [p for p in leftovers if p.is_file()] == [], leftovers
