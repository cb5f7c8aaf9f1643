"""Bad input gets a clear error naming the problem and the fix, and never breaks a reused pipeline."""
import json
import logging
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
    with pytest.raises(PromptError, match="2501 tokens long.*allows 62.*No build can hold that.*128 positions"):
        pipeline.generate(img, prompt="word " * 500)
    with pytest.raises(PromptError, match="image placeholder token"):
        pipeline.generate(img, prompt="a photo of <image>")
    with pytest.raises(PromptError, match="max_new_tokens=10000 exceeds .* limit of 62.*No build can hold that"):
        pipeline.generate(img, max_new_tokens=10_000)
    with pytest.raises(PromptError, match="max_new_tokens=80 exceeds .* rebuild with .*--max-new-tokens 80 "
                                          "--max-prompt-tokens 44"):
        pipeline.generate(img, max_new_tokens=80)
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


@pytest.mark.slow  # (a build of its own: the default suite's time)
def test_failed_build_leaves_nothing(tiny_engine, tmp_path, monkeypatch):
    import export.build as b
    from export.parity import ParityError, Tolerance

    monkeypatch.setitem(b.TOLERANCES, "fp32", Tolerance(atol=0.0, rtol=0.0, why="impossible, for the test"))
    with pytest.raises(ParityError):
        b.build(tiny_engine[0], "onnx", tmp_path / "out" / "engines")
    assert list(tmp_path.iterdir()) == []  # not even the empty folders the build made


@pytest.mark.slow  # (a build of its own: the default suite's time)
def test_rebuild_hint_of_the_runtime_gives_a_working_build(pipeline, checkpoint, tmp_path):
    """Asking for more tokens than the folder holds names a build command; that build works and serves them."""
    import re

    from export.build import build

    img = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(PromptError) as err:
        pipeline.generate(img, max_new_tokens=100)
    flags = dict(re.findall(r"--(max-new-tokens|max-prompt-tokens) (\d+)", str(err.value)))
    engine = build(checkpoint.path, "onnx", tmp_path,
                   max_new_tokens=int(flags["max-new-tokens"]), max_prompt_tokens=int(flags["max-prompt-tokens"]))
    rows = Blip2Pipeline.from_dir(engine).generate_ids(img, max_new_tokens=100, min_new_tokens=100)
    assert len(rows[0]) == 100


def test_limits_are_checked_before_any_export(tiny_engine, tmp_path):
    from export.build import build
    from export.specs import LimitError

    for limits, message in (({"max_new_tokens": 500}, r"--max-new-tokens must be in \[1, 123\]"),
                            ({"max_new_tokens": 100, "max_prompt_tokens": 30},
                             r"--max-prompt-tokens must be in \[1, 24\] with --max-new-tokens 100"),
                            ({"max_batch": 0}, "--max-batch must be an integer >= 1")):
        with pytest.raises(LimitError, match=message):
            build(tiny_engine[0], "onnx", tmp_path / "engines", **limits)
    assert not (tmp_path / "engines").exists()


def test_calibration_options_are_checked_before_the_checkpoint_is_read(tiny_engine, tmp_path, caplog):
    from export.build import Calibration, build
    from runtime.errors import ImageInputError

    (tmp_path / "few").mkdir()
    for calibration, message in ((Calibration(images=str(tmp_path / "none")), "--calib-images .* is not a folder"),
                                 (Calibration(images=str(tmp_path / "few")), "holds 0 images"),
                                 (Calibration(count=0), "--calib-count 0: give 1 or more"),
                                 (Calibration(report_images=-1), "--report-images -1: give 1 or more")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="export"), pytest.raises(ImageInputError, match=message):
            build(tiny_engine[0], "onnx-int8", tmp_path / "engines", calibration=calibration)
        assert caplog.messages == []  # (nothing loaded: "loading checkpoint ..." is the build's first line)
    assert not (tmp_path / "engines").exists()


def test_ill_defined_projection_is_refused(tmp_path):
    """language_projection outputs hidden_size values but OPT embeds word_embed_proj_dim wide: HF would stream
    one image's projection into the next row, so the build refuses before writing anything."""
    from export.build import build
    from train.blip2.checkpoint import CheckpointError
    from train.blip2.random_checkpoint import make_random_checkpoint

    ck = make_random_checkpoint(tmp_path / "ck", "tiny", seed=0, word_embed_proj_dim=16)
    with pytest.raises(CheckpointError, match="hidden_size=32.*word_embed_proj_dim=16"):
        build(ck, "onnx", tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def _build_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "export.build", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_build_cli_edges(tiny_engine, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = _build_cli("--model", str(tiny_engine[0]), "--out", str(tmp_path / "file"))
    assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = _build_cli("--model", str(tiny_engine[0]), "--out", str(tmp_path / "e"), "--max-new-tokens", "999")
    assert proc.returncode == 1 and "--max-new-tokens must be in [1, 123]" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_ctrl_c_during_a_build_is_one_line_and_leaves_nothing(tiny_engine, tmp_path):
    import signal
    import time

    out = tmp_path / "engines"
    proc = subprocess.Popen([sys.executable, "-m", "export.build", "--model", str(tiny_engine[0]), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # interrupt once the export is under way
        if "exporting" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted: no engine folder was written"
    assert not out.exists()


def test_engine_folders_are_readable_like_any_output(tiny_engine):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    engine = tiny_engine[1]
    assert stat.S_IMODE(engine.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((engine / "manifest.json").stat().st_mode) == 0o666 & ~umask


def test_runtime_points_at_the_right_folder(tiny_engine, tmp_path):
    engine = tiny_engine[1]
    with pytest.raises(EngineFolderError, match=f"holds engine folders.*pass one of {engine}"):
        Blip2Pipeline.from_dir(engine.parent)
    with pytest.raises(EngineFolderError, match="is a file; --engines takes an engine folder"):
        Blip2Pipeline.from_dir(engine / "manifest.json")
    with pytest.raises(EngineFolderError, match="is a checkpoint, not an engine folder.*export.build --model"):
        Blip2Pipeline.from_dir(tiny_engine[0])
    with pytest.raises(EngineFolderError, match=f"--target onnx --out {tmp_path / 'engines'} --name demo`"):
        Blip2Pipeline.from_dir(tmp_path / "engines" / "demo" / "onnx")


def test_manifest_errors_name_the_key(engine_copy):
    m = json.loads((engine_copy / "manifest.json").read_text())
    m["llm"]["eos_token_id"] = "two"
    del m["limits"]["max_batch"]
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineFolderError, match="'manifest.limits.max_batch' is missing.*rebuild it with"):
        Blip2Pipeline.from_dir(engine_copy)
    m["limits"]["max_batch"] = 8
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineFolderError, match="'manifest.llm.eos_token_id' is 'two', expected int"):
        Blip2Pipeline.from_dir(engine_copy)


def test_demo_cli_reads_booleans_as_flags():
    from train.__main__ import parser, recipe_from

    assert recipe_from(parser().parse_args(["demo", "--no-fp16-weights"])).fp16_weights is False
    assert recipe_from(parser().parse_args(["demo"])).fp16_weights is True
    proc = subprocess.run([sys.executable, "-m", "train", "demo", "--fp16-weights", "False"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: False" in proc.stderr


def _hub_cache(root, repo_id: str, folder) -> None:
    """`folder` laid out as the Hugging Face hub cache stores a downloaded snapshot of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.mark.slow  # (a build of its own: the default suite's time)
def test_model_given_as_a_hub_id_comes_from_the_local_cache(tiny_engine, tmp_path):
    import os

    _hub_cache(tmp_path / "hub", "someone/tiny-blip2", tiny_engine[0])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "engines"
    proc = subprocess.run([sys.executable, "-m", "export.build", "--model", "someone/tiny-blip2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    built = Blip2Pipeline.from_dir(out / "tiny-blip2" / "onnx")  # named after the repository, not the snapshot
    reference = Blip2Pipeline.from_dir(tiny_engine[1])
    images = [Image.new("RGB", (40, 30), (200, 30, 30))]
    assert built.caption(images, max_new_tokens=5) == reference.caption(images, max_new_tokens=5)

    proc = _build_cli("--model", "someone/not-downloaded", "--out", str(out), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "hf download someone/not-downloaded" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tiny-blip2"]


def _broken_copy(folder, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(folder, broken)
    return broken


def test_incomplete_weight_files_are_refused_before_loading(tiny_engine, tmp_path):
    """A shard the index names but the folder lacks, and a safetensors file cut short: the error names the file
    and the fix, and no engine folder is started (Hugging Face would fill a missing shard with random weights)."""
    from export.build import build
    from train.blip2.checkpoint import CheckpointError

    broken = _broken_copy(tiny_engine[0], tmp_path)
    weights = broken / "model.safetensors"
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 of the 2 weight shards .* missing \(model-00002-of-00002"
                                              r"\.safetensors\).* fetch the missing files"):
        build(broken, "onnx", tmp_path / "engines")
    (broken / "model.safetensors.index.json").unlink()
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: .* fetch or copy the file again"):
        build(broken, "onnx", tmp_path / "engines")
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        build(broken, "onnx", tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_too_little_disk_is_refused_before_anything_is_written(tiny_engine, tmp_path, monkeypatch):
    import export.build as b

    monkeypatch.setattr(b.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**6))
    with pytest.raises(b.BuildError, match=r"not enough disk for --target onnx-fp16: the build writes up to .* GB "
                                           r"\(the float32 graphs and the fp16 ones\) .* pass --out a folder"):
        b.build(tiny_engine[0], "onnx-fp16", tmp_path / "engines")
    assert list(tmp_path.iterdir()) == []
    # the estimate covers what the built graphs take (at full size: tests/test_full_size.py)
    assert sum(f.stat().st_size for f in tiny_engine[1].glob("*.onnx*")) <= b._output_bytes(tiny_engine[0], "fp32")


def test_a_mistyped_model_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`--model models/nope` where models/ exists: a path error, not advice to download 'models/nope'."""
    from train.blip2.checkpoint import CheckpointError, resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError, match=r"checkpoint folder not found: models/nope \(models has no 'nope'"):
        resolve_source("models/nope")
