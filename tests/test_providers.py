"""Execution providers and where decoder caches live: IO binding keeps the outputs a call names in `keep` (KV caches,
T5's cross keys/values) as OrtValues on the provider's device and binds them as they are at the next step.

On this machine the binding path runs on the CPU provider; `pytest -m gpu` runs it on CUDA's."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from export.parity import probe_images


def _gather_model(elem_type: int):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Gather", ["data", "index"], ["rows"], axis=0)], "gather",
                              [helper.make_tensor_value_info("data", elem_type, None),
                               helper.make_tensor_value_info("index", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("rows", elem_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7, producer_name="")
    return onnx, model


@pytest.mark.parametrize("dtype,elem_type", [(np.float32, 1), (np.float16, 10)])
def test_gather_model_is_one_gather_and_gathers_rows_as_numpy_does(dtype, elem_type):
    """runtime.ort_runner' Gather model (how an OrtArray on a GPU reorders its rows there) is what onnx.helper builds,
    and run through ONNX Runtime's IO binding it gathers any rows, repeated and reordered, as numpy indexing does."""
    import onnxruntime as ort

    from runtime.ort_runner import GATHER_MODEL, gather_rows

    onnx, model = _gather_model(elem_type)
    assert onnx.load_from_string(bytes.fromhex(GATHER_MODEL.format(t=f"{elem_type:02x}"))) == model
    cache = np.random.default_rng(0).standard_normal((5, 2, 7, 4)).astype(dtype)
    index = np.array([4, 0, 0, 2])
    rows = gather_rows(ort.OrtValue.ortvalue_from_numpy(cache), index, ("cpu", 0))
    np.testing.assert_array_equal(rows.numpy(), cache[index])


def _steps(runner, feeds, keep, steps=3):
    """Prefill, then `steps` one-token steps of an OPT llm_decoder, the cache fed back as the runner returned it."""
    from runtime.decoder import KVCache

    layers = sum(n.startswith("present_key_") for n in runner.output_names)
    cache = KVCache(layers)
    n = feeds["input_ids"].shape[0]
    cache.reset(n, *[d for i in runner.session.get_inputs() if i.name == "past_key_0" for d in (i.shape[1],
                                                                                                i.shape[3])])
    mask, logits, kinds = feeds["attention_mask"], [], set()
    out = runner.run({**feeds, **cache.feeds()}, keep=cache.present_names if keep else ())
    for _ in range(steps):
        cache.update(out)
        kinds |= {type(a).__name__ for a in cache.arrays}
        logits.append(np.array(out["logits"]))
        token = out["logits"].argmax(-1).reshape(n, 1)
        mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)
        width = feeds["soft_prompt"].shape[2]
        out = runner.run({"input_ids": token, "attention_mask": mask, "position_ids": mask.sum(1, keepdims=True) - 1,
                          "soft_prompt": np.zeros((n, 0, width), np.float32), **cache.feeds()},
                         keep=cache.present_names if keep else ())
    return logits, kinds


def test_kept_caches_are_ortvalues_fed_back_bound_and_compute_what_numpy_caches_do(tiny_engine):
    """With keep, the cache comes back as OrtArrays (not numpy) and is bound as it is at the next step; the logits
    of every step are those of the same steps with numpy caches (session.run), exactly: the same kernels run."""
    import onnxruntime as ort

    from runtime.ort_runner import OrtArray
    from runtime.backends import make_runner

    runner = make_runner(tiny_engine[1] / "llm_decoder.onnx")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 50, size=(2, 5))
    width = next(i.shape[2] for i in runner.session.get_inputs() if i.name == "soft_prompt")
    feeds = {"input_ids": ids, "attention_mask": np.ones((2, 5), np.int64),
             "position_ids": np.tile(np.arange(5), (2, 1)), "soft_prompt": np.zeros((2, 0, width), np.float32)}
    bound, kinds = _steps(runner, feeds, keep=True)
    plain, plain_kinds = _steps(runner, feeds, keep=False)
    assert kinds == {"OrtArray"} and plain_kinds == {"ndarray"}
    for a, b in zip(bound, plain):
        np.testing.assert_array_equal(a, b)
    rows = OrtArray(ort.OrtValue.ortvalue_from_numpy(np.arange(6.0).reshape(3, 2)))[np.array([2, 0])]
    assert isinstance(rows, OrtArray) and rows.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(rows), [[4.0, 5.0], [0.0, 1.0]])


@pytest.mark.parametrize("variant", ["tiny", "t5"])
def test_generate_with_bound_caches_equals_generate_with_numpy_caches(make_engine, variant, monkeypatch):
    """Whole generations (greedy, and beam search, which reorders the bound caches every step) give the same
    tokens with caches kept by IO binding as with every cache a numpy array."""
    from runtime import Blip2Pipeline
    from runtime.ort_runner import OrtRunner

    _, engine = make_engine(variant)
    pipe = Blip2Pipeline.from_dir(engine)
    images = probe_images(pipe.manifest.model.image_size, count=3, seed=5)
    options = [{"max_new_tokens": 6}, {"max_new_tokens": 6, "num_beams": 3}]
    bound = [pipe.generate_ids(images, **o) for o in options]
    monkeypatch.setattr(OrtRunner, "_infer", lambda self, feeds, keep=frozenset(): self.session.run(
        self.output_names, {k: np.asarray(v) for k, v in feeds.items()}))
    plain = [pipe.generate_ids(images, **o) for o in options]
    assert bound == plain


def test_a_provider_this_install_lacks_is_named_with_the_fix_before_any_graph_opens(tiny_engine):
    """ONNX Runtime itself only warns and runs on the CPU when asked for a provider it lacks."""
    from runtime import Blip2Pipeline
    from runtime.errors import BackendError

    with pytest.raises(BackendError, match="CUDAExecutionProvider not available.*onnxruntime-gpu"):
        Blip2Pipeline.from_dir(tiny_engine[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match="NoSuchExecutionProvider not available.*has .*CPUExecutionProvider"):
        Blip2Pipeline.from_dir(tiny_engine[1], providers=["NoSuchExecutionProvider"])
    pipe = Blip2Pipeline.from_dir(tiny_engine[1], providers=[("CPUExecutionProvider", {})])
    assert pipe.runners["llm_decoder"].session.get_providers() == ["CPUExecutionProvider"]


def test_provider_devices_and_the_gpus_an_actor_asks_for():
    from runtime.actors import gpus_per_actor
    from runtime.ort_runner import provider_device

    assert provider_device(["CPUExecutionProvider"]) == ("cpu", 0)
    assert provider_device([("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]) == ("cuda", 1)
    assert provider_device(["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == ("cuda", 0)

    class OnnxFolder:
        is_tensorrt = False

    assert gpus_per_actor(OnnxFolder()) == 0.0
    assert gpus_per_actor(OnnxFolder(), providers=["CPUExecutionProvider"]) == 0.0
    assert gpus_per_actor(OnnxFolder(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]) == 1.0
    assert gpus_per_actor(OnnxFolder(), 0.5, providers=["CUDAExecutionProvider"]) == 0.5


def test_providers_option_of_the_command_line(tiny_engine, tmp_path):
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "blue.png")
    base = [sys.executable, "-m", "runtime", "caption", "--engines", str(tiny_engine[1]), "--max-new-tokens", "4"]
    plain = subprocess.run(base + [str(tmp_path / "blue.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    cpu = subprocess.run(base + ["--providers", "CPUExecutionProvider", str(tmp_path / "blue.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and cpu.returncode == 0, cpu.stderr
    assert cpu.stdout == plain.stdout
    cuda = subprocess.run(base + ["--providers", "CUDAExecutionProvider", str(tmp_path / "blue.png")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert cuda.returncode == 2 and "onnxruntime-gpu" in cuda.stderr and "Traceback" not in cuda.stderr


@pytest.mark.gpu
def test_caches_stay_on_the_gpu_with_cuda_and_tokens_equal_the_cpu(tiny_engine):
    """With onnxruntime-gpu: the kept caches are CUDA OrtValues between steps, and greedy tokens equal the CPU's
    (tiny model, no near-ties at its logits' scale)."""
    import onnxruntime as ort

    from runtime import Blip2Pipeline

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA provider")
    gpu = Blip2Pipeline.from_dir(tiny_engine[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = Blip2Pipeline.from_dir(tiny_engine[1])
    images = probe_images(cpu.manifest.model.image_size, count=2, seed=5)
    runner, seen = gpu.runners["llm_decoder"], []
    run = runner.run
    runner.run = lambda feeds, keep=(): seen.append(run(feeds, keep)) or seen[-1]
    assert gpu.generate_ids(images, max_new_tokens=6, num_beams=2) == cpu.generate_ids(images, max_new_tokens=6,
                                                                                         num_beams=2)
    assert {seen[-1][n].value.device_name().lower() for n in seen[-1] if n.startswith("present_")} == {"cuda"}
