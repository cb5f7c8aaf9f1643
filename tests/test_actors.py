"""The GPUs a Ray actor running a pipeline asks for (runtime/actors.py): none for ONNX Runtime's CPU folders, one
(or a given share) for a TensorRT folder, so that Ray places the actors on GPUs; and `runtime batch` / `runtime
serve` on a machine where Ray sees no GPU say so in one line instead of waiting for ever for one."""
import json
import os
import subprocess
import sys

import pytest

from runtime.actors import ActorResourceError, gpus_per_actor
from runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def folders(make_engine, tmp_path_factory):
    """(an ONNX Runtime folder, a TensorRT folder): the second is the first's manifest with target trt-fp16 over
    empty files (nothing here opens them: no GPU, no TensorRT)."""
    _, engine = make_engine("stage2text")
    trt = tmp_path_factory.mktemp("trt-fp16")
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["target"] = "trt-fp16"
    (trt / "manifest.json").write_text(json.dumps(manifest))
    for name in load_manifest(engine).files():
        (trt / name).touch()
    return engine, trt


def test_tensorrt_actors_ask_for_a_gpu_and_onnx_runtime_actors_for_none(folders):
    onnx, trt = (load_manifest(f) for f in folders)
    assert trt.is_tensorrt and not onnx.is_tensorrt
    assert gpus_per_actor(onnx) == 0.0 and gpus_per_actor(trt) == 1.0
    assert gpus_per_actor(trt, 0.5) == 0.5 and gpus_per_actor(onnx, 1) == 1.0  # (as asked)
    assert gpus_per_actor(trt, 0) == 0.0  # (a GPU Ray does not detect, as a Jetson's: the actors use it unasked)
    for bad in (-1, float("nan"), "one", True):
        with pytest.raises(ActorResourceError, match="give the GPUs each worker uses"):
            gpus_per_actor(onnx, bad)


def test_batch_on_a_machine_without_a_gpu_says_so_and_writes_nothing(folders, tmp_path):
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    import ray

    from export.parity import probe_images
    from runtime.batch import Job, run

    _, trt = folders
    probe_images(32, count=1)[0].save(tmp_path / "a.png")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        refusal = r"2 workers ask for 2 GPUs \(1 each\) but Ray sees 0 on this machine.*--gpus 0 runs"
        with pytest.raises(ActorResourceError, match=refusal):
            run(Job(engines=str(trt), task="caption", input=str(tmp_path), output=str(tmp_path / "out"), workers=2))
    finally:
        ray.shutdown()
    assert not (tmp_path / "out").exists()  # nothing half-made


def test_serve_on_a_machine_without_a_gpu_is_one_error_line(folders):
    pytest.importorskip("ray.serve")
    _, trt = folders
    out = subprocess.run([sys.executable, "-m", "runtime", "serve", "--engines", str(trt), "--port", "8791"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "RAY_ADDRESS": "local"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: 1 replica asks for 1 GPU (1 each) but Ray sees 0 on this machine" in out.stderr
