"""TensorRT for real: engines built from tiny fp32 ONNX exports, run by TrtRunner, compared with PyTorch.

Needs TensorRT, cuda-python and an NVIDIA GPU; everywhere else every test here is skipped with the reason
(tests/test_tensorrt_offline.py covers what runs without them). Run with `pytest -m gpu tests/test_tensorrt_gpu.py`.
"""
import numpy as np
import pytest

from conftest import QFORMER_VARIANTS, VARIANTS
from runtime.errors import BackendError
from runtime.trt_runner import DeviceTensor, TrtRunner, import_tensorrt


def _unavailable() -> str | None:
    try:
        import_tensorrt()
    except BackendError as e:
        return str(e).split(". ")[0]
    return None


REASON = _unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a GPU: {REASON}")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(variant) -> (checkpoint, {graph: (spec, engine path)}): fp32 ONNX exports compiled by build_engine."""
    from export.onnx_export import export_graph
    from export.specs import graph_specs
    from export.trt_build import build_engine
    from train.blip2.checkpoint import load_checkpoint
    from train.blip2.random_checkpoint import make_random_checkpoint

    cache = {}

    def build(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"trt-{variant}")
            options = dict({**VARIANTS, **QFORMER_VARIANTS}[variant])
            ck = load_checkpoint(make_random_checkpoint(root / "ck", options.pop("preset", "tiny"), seed=0, **options))
            engines = {}
            for spec in graph_specs(ck.model):
                onnx = export_graph(spec, ck.model, root)
                # tf32=False: TensorRT lets fp32 matmuls run in TF32 by default (10-bit mantissa inputs, errors
                # ~1e-3 relative), which the fp32 tolerances of export/parity.py are not meant for. The trt-fp16 /
                # trt-int8 targets keep TF32 on and are gated by their own (fp16 / int8) tolerances.
                info = build_engine(onnx, spec, root / f"{spec.name}.engine", timing_cache_path=root / "timing.cache",
                                    tf32=False)
                assert info["profiles"] and info["engine_bytes"] > 0
                engines[spec.name] = (spec, root / info["engine"])
            cache[variant] = (ck, engines)
        return cache[variant]

    return build


@pytest.mark.parametrize("variant", ["tiny", "stage1", "t5"])
def test_every_graph_matches_pytorch(built, variant):
    from export.parity import TOLERANCES, check_graph, raise_on_failure

    ck, engines = built(variant)
    results = []
    for name, (spec, engine) in engines.items():
        results += check_graph(spec, spec.build(ck.model).eval(), TrtRunner(engine), TOLERANCES["fp32"])
    raise_on_failure(results)
    # prefill (past=0, the context profile) and single-token steps (the generation profile) were both checked
    cases = {r.case for r in results if r.graph == "llm_decoder"}
    assert variant != "tiny" or (any("past=0" in c for c in cases) and any("text=1" in c for c in cases))


def test_build_info_of_this_machine_is_accepted(built):
    from export.trt_build import hardware_info

    _, engines = built("tiny")
    info = hardware_info()
    assert info["compute_capability"].count(".") == 1 and info["gpu"] and info["tensorrt"]
    TrtRunner(engines["vision"][1], build_info=info)  # no EngineFolderError


def test_kv_cache_stays_on_device(built):
    import torch

    from export.graph_spec import torch_inputs

    ck, engines = built("tiny")
    spec, engine = engines["llm_decoder"]
    wrapper = spec.build(ck.model).eval()
    runner = TrtRunner(engine)
    present = [n for n in runner.output_names if n.startswith("present_")]
    past = [n.replace("present_", "past_", 1) for n in present]

    def reference(feeds):
        host = {k: v.numpy() if isinstance(v, DeviceTensor) else v for k, v in feeds.items()}
        with torch.no_grad():
            return [t.numpy() for t in wrapper(*torch_inputs(spec, host))]

    def close(got, ref):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)

    nq = spec.export_sizes["queries"]
    feeds = spec.make_inputs({"batch": 2, "text": nq + 3, "past": 0, "queries": nq}, np.random.default_rng(0))
    out = runner.run(feeds, keep=present)
    assert all(isinstance(out[n], DeviceTensor) for n in present) and isinstance(out["logits"], np.ndarray)
    ref = reference(feeds)
    close(out["logits"], ref[0])
    for n, r in zip(present, ref[1:]):
        close(out[n].numpy(), r)

    mask = feeds["attention_mask"]
    hidden = feeds["soft_prompt"].shape[2]
    for step in range(3):  # one token at a time, the cache fed back as device tensors
        if step == 1:  # beam-style reordering on the device
            index = np.array([1, 0])
            before = [out[n].numpy() for n in present]
            out = {**out, **{n: out[n][index] for n in present}}
            for n, b in zip(present, before):
                np.testing.assert_array_equal(out[n].numpy(), b[index])
            mask = mask[index]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        step_feeds = {
            "input_ids": np.array([[5], [6]], np.int64),
            "soft_prompt": np.zeros((2, 0, hidden), np.float32),  # empty: bound to the dummy address
            "attention_mask": mask,
            "position_ids": (np.cumsum(mask, axis=1) - 1)[:, -1:].clip(0).astype(np.int64),
            **{p: out[n] for p, n in zip(past, present)},
        }
        ref = reference(step_feeds)
        out = runner.run(step_feeds, keep=present)
        close(out["logits"], ref[0])
        for n, r in zip(present, ref[1:]):
            assert isinstance(out[n], DeviceTensor)
            close(out[n].numpy(), r)


@pytest.mark.parametrize("variant", ["stage2text", "t5"])
@pytest.mark.parametrize("target", ["trt-fp16", "trt-int8"])
def test_trt_targets_build_and_follow_hugging_face(make_engine, target, variant):
    """The whole target: fp16 / Q/DQ ONNX -> engines -> gate -> Blip2Pipeline on backend 'tensorrt' (chosen
    automatically), checked here against Hugging Face itself: ITM probabilities and teacher-forced captions
    within the precision's end-to-end bounds."""
    import torch

    from export.parity import probe_images
    from hf_calls import hf_generate, hf_pixel_values, qformer_texts
    from runtime import Blip2Pipeline
    from runtime.manifest import load_manifest
    from runtime.trt_runner import current_hardware
    from train.blip2.checkpoint import load_checkpoint

    ck_dir, engine = make_engine(variant, target)
    ck = load_checkpoint(ck_dir)
    assert load_manifest(engine).build.tensorrt["compute_capability"] == current_hardware()["compute_capability"]
    pipe = Blip2Pipeline.from_dir(engine)
    assert pipe.backend == "tensorrt"
    images, texts = probe_images(32, count=2, seed=3), ["a red circle", "a photo"]
    with torch.no_grad():
        ids, mask = qformer_texts(ck, texts)
        ref = ck.model.hf_model(stage=1)(pixel_values=hf_pixel_values(ck, images), input_ids=ids, attention_mask=mask,
                                         use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    assert np.abs(pipe.itm(images, texts) - ref.numpy()).max() < 0.05
    expected = hf_generate(ck, images, None, max_new_tokens=8)
    picks = [s.argmax(-1).tolist() for s in pipe.score(images, expected)]
    agree = sum(a == b for p, r in zip(picks, expected) for a, b in zip(p, r)) / sum(len(r) for r in expected)
    assert agree >= {"trt-fp16": 0.95, "trt-int8": 0.85}[target]
    assert len(pipe.generate_ids(images, max_new_tokens=5, num_beams=2)) == 2
