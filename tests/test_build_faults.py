"""`python -m export.build` under the faults a deployment's build meets: SIGTERM (a CI runner, `timeout`), a killed
build's leftovers, a full disk, and a reduced build of a model its default calibration images do not fit."""
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export import build as build_module
from export.build import BuildError, Calibration, _check_calibration_fits, _remove_leftovers
from train.blip2.random_checkpoint import RANDOM_MARK


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sigterm_ends_a_build_in_one_line_with_nothing_left(tmp_path):
    out = tmp_path / "engines"
    proc = subprocess.Popen([sys.executable, "-m", "export.build", "--model", "models/demo", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline:  # (until the build has started writing)
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted: no engine folder was written" and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_a_killed_builds_leftovers_are_removed_and_only_they(tmp_path, caplog):
    final = tmp_path / "demo" / "onnx"
    final.parent.mkdir()
    dead, alive = _dead_pid(), os.getpid()
    names = [f".onnx.partial-{dead}-1", f".onnx.old-{dead}-2", f".onnx.partial-{alive}-3", ".onnx.old-123", ".other",
             f".onnx-int8.partial-{dead}-4"]
    for name in names:
        (final.parent / name).mkdir()
    with caplog.at_level(logging.INFO, logger="export"):
        _remove_leftovers(final)
    said = caplog.messages
    left = sorted(p.name for p in final.parent.iterdir())
    assert left == sorted(names[2:]), left  # another build's (alive), a name without a pid, another target's
    assert len(said) == 2 and all(f"process {dead} is gone" in line for line in said)


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    def full(*_, **__):
        raise OSError(28, "No space left on device", "/data/engines/x/.onnx.partial-1-2/llm.onnx")

    monkeypatch.setattr(build_module, "build", full)
    assert build_module.main(["--model", "models/demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No space left on device") and "no engine folder" in err[0]


def test_int8_of_a_model_not_trained_on_shapescaps_needs_its_own_calibration_images(tmp_path):
    checkpoint = tmp_path / "user-model"
    shutil.copytree("models/demo", checkpoint)
    (checkpoint / "recipe.json").unlink()  # (as any checkpoint not trained by the demo recipe)
    with pytest.raises(BuildError, match="--calib-images DIR"):
        _check_calibration_fits(checkpoint, Calibration(), "onnx-int8")
    with pytest.raises(BuildError, match="--calib-images DIR"):  # (refused before anything is loaded)
        build_module.build(checkpoint, "onnx-int8", tmp_path / "engines")
    assert not (tmp_path / "engines").exists()
    _check_calibration_fits(checkpoint, Calibration(images=str(tmp_path)), "onnx-int8")  # given: fine
    _check_calibration_fits(Path("models/demo"), Calibration(), "onnx-int8")  # trained on ShapesCaps: fine
    (checkpoint / RANDOM_MARK).write_text("{}")  # random weights (train.blip2.random_checkpoint): fine
    _check_calibration_fits(checkpoint, Calibration(), "onnx-int8")


def test_what_a_newcomer_trips_on_is_one_line(tmp_path, make_engine):
    """--steps 0 is refused (it trained a whole epoch); a default max_new_tokens never exceeds the folder's limit
    (the Q-Former decoder's is below the CLI's 30); the conversion summary prints no raw Python dicts."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "train", "stage2", "--data", "x.jsonl", "--out", str(tmp_path / "o"),
                          "--steps", "0"], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: --steps 0: give a number above 0 (leave --steps out to train --epochs over the data)")
    assert not (tmp_path / "o").exists()
    from export.build import _conversion_line
    from runtime import Blip2Pipeline
    from runtime.search import DEFAULT_MAX_NEW_TOKENS
    from export.parity import probe_images

    _, engine = make_engine("stage2text")
    pipe = Blip2Pipeline.from_dir(engine)
    prompt = "a red circle above a large blue square on the left"
    ids, _ = pipe.itg.tokenizer.encode_prompts([prompt])
    room = pipe.manifest.limits.max_qformer_tokens - ids.shape[1]  # ([DEC], the prompt, then the text)
    assert room < DEFAULT_MAX_NEW_TOKENS  # (precondition: the default would not fit)
    image = probe_images(32, count=1, seed=2)[0]
    assert (pipe.generate(image, prompt=prompt, decoder="qformer")
            == pipe.generate(image, prompt=prompt, decoder="qformer", max_new_tokens=room))
    line = _conversion_line("int8", {"kept_fp32": {"attention output projections": 2, "other": 0}})
    assert line == "int8; kept in float32: 2 attention output projections" and "{" not in line
