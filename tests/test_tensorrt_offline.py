"""The TensorRT backend without TensorRT: imports, install messages, compatibility checks, profile selection, and the
runner / builder plumbing against small fakes of TensorRT and of the CUDA runtime (device memory in host bytearrays).

What the fakes cannot tell (the real API, real kernels) is checked by tests/test_tensorrt_gpu.py on a GPU.
"""
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from conftest import ROOT
from export import trt_build
from export.trt_build import TensorRTUnavailable, TrtBuildError, build_engine, require_tensorrt
from runtime import trt_runner
from runtime.decoder import CachedDecoder
from runtime.errors import BackendError, EngineFolderError
from runtime.backends import make_runner
from runtime.trt_runner import DeviceTensor, TrtRunner, check_compatible, pick_profile


# ---------------------------------------------------------------- fakes
class FakeCuda:
    """CudaRuntime's interface over host memory: addresses are ints, allocations bytearrays."""

    def __init__(self, devices=1):
        self.mem, self.next, self.devices, self.copies = {}, 0x10000, devices, []

    def malloc(self, n):
        ptr, self.next = self.next, self.next + (n // 256 + 2) * 256
        self.mem[ptr] = bytearray(n)
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def _at(self, ptr, n):
        for base, buf in self.mem.items():
            if base <= ptr and ptr + n <= base + len(buf):
                return memoryview(buf)[ptr - base: ptr - base + n]
        raise AssertionError(f"access outside any allocation: {ptr:#x} + {n}")

    def htod(self, dst, array):
        self.copies.append("htod")
        self._at(dst, array.nbytes)[:] = array.tobytes()

    def dtoh(self, array, src):
        self.copies.append("dtoh")
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(self._at(src, array.nbytes), np.uint8)

    def dtod(self, dst, src, n):
        self.copies.append("dtod")
        self._at(dst, n)[:] = bytes(self._at(src, n))

    def stream_create(self):
        return 7

    def stream_sync(self, stream):
        pass

    def stream_destroy(self, stream):
        pass

    def device_count(self):
        if not self.devices:
            raise BackendError("CUDA cudaGetDeviceCount failed: cudaErrorNoDevice")
        return self.devices

    def device_info(self):
        return {"gpu": "Fake Orin", "compute_capability": "8.7", "cuda": "12.6", "cuda_driver": "12.6"}

    def read(self, ptr, shape, dtype):
        out = np.empty(shape, dtype)
        if out.size:
            self.dtoh(out, ptr)
        return out


# A toy decoder engine with the llm_decoder's two-profile layout: present = concat(past, ids) along axis 1,
# logits = sum over present. Profile 0: 2..8 tokens, empty cache; profile 1: one token, cache 1..15.
TOY_TENSORS = {
    "input_ids": ("INPUT", np.int64), "attention_mask": ("INPUT", np.int64), "position_ids": ("INPUT", np.int64),
    "past_key_0": ("INPUT", np.float32), "logits": ("OUTPUT", np.float32), "present_key_0": ("OUTPUT", np.float32),
}
TOY_PROFILES = [
    {"input_ids": ((1, 2), (1, 4), (4, 8)), "attention_mask": ((1, 2), (1, 4), (4, 8)),
     "position_ids": ((1, 2), (1, 4), (4, 8)), "past_key_0": ((1, 0), (1, 0), (4, 0))},
    {"input_ids": ((1, 1), (1, 1), (4, 1)), "attention_mask": ((1, 2), (1, 5), (4, 16)),
     "position_ids": ((1, 1), (1, 1), (4, 1)), "past_key_0": ((1, 1), (1, 4), (4, 15))},
]


class ToyContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int)
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        low, _, high = TOY_PROFILES[self.profile][name]
        self.shapes[name] = tuple(shape)
        return all(a <= s <= b for s, a, b in zip(shape, low, high))

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        batch, past = self.shapes["past_key_0"]
        return (batch,) if name == "logits" else (batch, past + self.shapes["input_ids"][1])

    def set_tensor_address(self, name, ptr):
        assert ptr, f"null address bound for {name}"
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        cuda = self.engine.cuda
        self.engine.calls.append(self.profile)
        ids = cuda.read(self.addresses["input_ids"], self.shapes["input_ids"], np.int64)
        past = cuda.read(self.addresses["past_key_0"], self.shapes["past_key_0"], np.float32)
        present = np.concatenate([past, ids.astype(np.float32)], axis=1)
        cuda.htod(self.addresses["present_key_0"], present)
        cuda.htod(self.addresses["logits"], present.sum(axis=1))
        return True


class ToyEngine:
    def __init__(self, cuda):
        self.cuda, self.calls, self.names = cuda, [], list(TOY_TENSORS)
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(TOY_PROFILES)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return TOY_TENSORS[name][0]

    def get_tensor_dtype(self, name):
        return TOY_TENSORS[name][1]

    def get_tensor_shape(self, name):
        return (-1,) if name == "logits" else (-1, -1)

    def get_tensor_profile_shape(self, name, profile):
        return TOY_PROFILES[profile][name]

    def create_execution_context(self):
        return ToyContext(self)


def fake_tensorrt(cuda, deserialized: list) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.30"

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            deserialized.append(plan)
            return ToyEngine(cuda) if plan == b"toy-plan" else None

    trt.Runtime, trt.Builder = Runtime, object
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dtype: dtype
    return trt


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A fake CUDA runtime and TensorRT module in place of the real ones; returns (cuda, engine path, deserialized)."""
    cuda, deserialized = FakeCuda(), []
    monkeypatch.setattr(trt_runner, "_CUDA", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cuda, deserialized))
    plan = tmp_path / "trt-fp16" / "toy.engine"
    plan.parent.mkdir()
    plan.write_bytes(b"toy-plan")
    return cuda, plan, deserialized


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


# ---------------------------------------------------------------- imports and install messages
def test_modules_import_without_tensorrt_cuda_or_torch():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorrt", "cuda", "torch", "transformers"):
                    raise ImportError(f"blocked import of {name}")
        sys.meta_path.insert(0, Block())
        import runtime.trt_runner
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules), "runtime imported torch"
        import export.trt_build
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_require_tensorrt_says_what_to_install(no_tensorrt):
    with pytest.raises(TensorRTUnavailable) as e:
        require_tensorrt()
    msg = str(e.value)
    assert "tensorrt" in msg and 'pip install ".[trt]"' in msg
    assert "sudo apt install python3-libnvinfer" in msg  # Jetson: the JetPack's bindings
    assert "--target onnx-fp16" in msg and "onnx-int8" in msg  # the way out without TensorRT
    assert isinstance(e.value, BackendError)


def test_require_tensorrt_without_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeCuda(), []))
    monkeypatch.setattr(trt_runner, "_CUDA", None)
    for name in ("cuda", "cuda.bindings", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TensorRTUnavailable, match="cuda-python") as e:
        require_tensorrt()
    assert "pip install" in str(e.value)


def test_require_tensorrt_without_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeCuda(), []))
    monkeypatch.setattr(trt_runner, "_CUDA", FakeCuda(devices=0))
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU") as e:
        require_tensorrt()
    assert "cudaErrorNoDevice" in str(e.value) and "driver" in str(e.value)


def test_make_runner_tensorrt_without_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(BackendError) as e:
        make_runner(tmp_path / "vision.engine", backend="tensorrt")
    assert "TensorRT" in str(e.value) and "pip install" in str(e.value)


def test_hardware_info_through_cuda_runtime(fake_gpu):
    assert trt_build.hardware_info() == {"tensorrt": "10.3.0.30", "gpu": "Fake Orin", "compute_capability": "8.7",
                                         "cuda": "12.6", "cuda_driver": "12.6"}


# ---------------------------------------------------------------- engine compatibility
HERE = {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7", "cuda": "12.6"}


@pytest.mark.parametrize("field, built", [("compute_capability", "9.0"), ("tensorrt", "11.4.0.1"), ("gpu", "H100")])
def test_check_compatible_refuses_another_setup(monkeypatch, tmp_path, field, built):
    monkeypatch.setattr(trt_runner, "current_hardware", lambda: dict(HERE))
    folder = tmp_path / "demo" / "trt-int8"
    with pytest.raises(EngineFolderError) as e:
        check_compatible({**HERE, field: built}, folder)
    msg = str(e.value)
    assert built in msg and HERE[field] in msg and str(folder) in msg
    assert "python -m export.build --model CHECKPOINT --target trt-int8" in msg


def test_check_compatible_accepts_same_setup(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_runner, "current_hardware", lambda: dict(HERE))
    check_compatible({**HERE, "cuda": "12.2"}, tmp_path)  # only TensorRT, compute capability and GPU are binding


def test_check_compatible_without_tensorrt(no_tensorrt, tmp_path):
    with pytest.raises(BackendError, match="pip install"):
        check_compatible(HERE, tmp_path)


def test_runner_checks_build_info_before_deserializing(fake_gpu):
    _, plan, deserialized = fake_gpu
    with pytest.raises(EngineFolderError, match="compute capability: built with 7.2, this machine has 8.7"):
        TrtRunner(plan, build_info={"tensorrt": "10.3.0.30", "gpu": "Fake Orin", "compute_capability": "7.2"})
    assert deserialized == []
    TrtRunner(plan, build_info={"tensorrt": "10.3.0.30", "gpu": "Fake Orin", "compute_capability": "8.7"})
    assert deserialized == [b"toy-plan"]


def test_runner_reports_missing_or_foreign_plan(fake_gpu):
    _, plan, _ = fake_gpu
    with pytest.raises(EngineFolderError, match="not found"):
        TrtRunner(plan.with_name("missing.engine"))
    plan.write_bytes(b"built by another TensorRT")
    with pytest.raises(EngineFolderError, match="could not load .* rebuild it on this device .*--target trt-fp16"):
        TrtRunner(plan)


# ---------------------------------------------------------------- profile selection on the real specs
# The known spec: the tiny preset's OPT decoder with the build's default limits. Its sizes (checked in the fixture):
NQ, LAYERS, HEADS, HEAD_DIM, HIDDEN, POSITIONS = 4, 2, 4, 8, 32, 128
# export.specs.resolve_limits' documented defaults: --max-batch 8; a decoder-only LLM must fit its position table
# (queries + prompt + new tokens <= positions), new = min(64, (128 - 4) // 2) = 62, prompt = min(64, 124 - 62) = 62.
MAX_BATCH, MAX_PROMPT, MAX_NEW = 8, 62, 62
KV = [f"past_{kind}_{layer}" for layer in range(LAYERS) for kind in ("key", "value")]
# TensorRT's KV-cache decoder layout (shared/TENSORRT.md): one engine, two optimization profiles, every dynamic input
# given (min, opt, max) in each. Profile 0, the context (prefill): the soft prompt's 4 queries + 1 (BOS) .. 4 + 62
# prompt tokens, empty cache (past 0); profile 1, generation: one token against a cache of 1 .. 4 + 62 + 62 - 1 = 127
# positions (the mask, past + 1, then reaches the position table's 128). Opt is the code's stated tuning point (a
# prompt of 8 tokens; 16 tokens past the queries) and must lie in [min, max] (TensorRT rejects it otherwise).
CONTEXT = {
    "input_ids": ((1, 5), (1, 12), (8, 66)),
    "soft_prompt": ((1, 4, 32), (1, 4, 32), (8, 4, 32)),
    "attention_mask": ((1, 5), (1, 12), (8, 66)),
    "position_ids": ((1, 5), (1, 12), (8, 66)),
    **{name: ((1, 4, 0, 8), (1, 4, 0, 8), (8, 4, 0, 8)) for name in KV},
}
GENERATION = {
    "input_ids": ((1, 1), (1, 1), (8, 1)),
    "soft_prompt": ((1, 0, 32), (1, 0, 32), (8, 0, 32)),
    "attention_mask": ((1, 2), (1, 21), (8, 128)),
    "position_ids": ((1, 1), (1, 1), (8, 1)),
    **{name: ((1, 4, 1, 8), (1, 4, 20, 8), (8, 4, 127, 8)) for name in KV},
}
LONGEST_PROMPT, LONGEST_PAST = 66, 127  # CONTEXT's largest text axis, GENERATION's largest cache


@pytest.fixture(scope="module")
def tiny_specs(tmp_path_factory):
    from train.blip2.checkpoint import load_checkpoint
    from export.specs import graph_specs
    from train.blip2.random_checkpoint import make_random_checkpoint

    ck = load_checkpoint(make_random_checkpoint(tmp_path_factory.mktemp("trt-offline") / "ck", "tiny", seed=0,
                                                qformer_text=True))  # (every graph: the Q-Former's text ones too)
    cfg, text = ck.model.config, ck.model.config.text_config
    assert (cfg.num_query_tokens, text.num_hidden_layers, text.num_attention_heads, text.hidden_size,
            text.max_position_embeddings) == (NQ, LAYERS, HEADS, HIDDEN, POSITIONS) and HIDDEN == HEADS * HEAD_DIM
    return {s.name: s for s in graph_specs(ck.model)}


@pytest.fixture(scope="module")
def decoder_spec(tiny_specs):
    return tiny_specs["llm_decoder"]


def _shapes(spec, sizes):
    return {k: v.shape for k, v in spec.make_inputs(sizes, np.random.default_rng(0)).items()}


def _tensorrt_profile_errors(inputs, profile) -> list[str]:
    """TensorRT's rules for one optimization profile {input: (min, opt, max)} of a network with `inputs`
    (TensorSpec: ints for static axes, names for dynamic ones, "a+b" for a sum of two): every input with a dynamic
    axis has a (min, opt, max); min <= opt <= max in every dimension; static dimensions are the network's in all
    three; and each of the min / opt / max shape sets is one consistent input (a named axis has one size across
    inputs, a sum axis the sum of its parts)."""
    errors = []
    dynamic = {t.name for t in inputs if any(isinstance(a, str) for a in t.shape)}
    if set(profile) != dynamic:
        errors.append(f"profile inputs {sorted(profile)} != dynamic inputs {sorted(dynamic)}")
    for t in inputs:
        if t.name not in profile:
            continue
        low, opt, high = profile[t.name]
        if not len(low) == len(opt) == len(high) == len(t.shape):
            errors.append(f"{t.name}: ranks {len(low)}, {len(opt)}, {len(high)}, the network's {len(t.shape)}")
            continue
        for d, (axis, a, b, c) in enumerate(zip(t.shape, low, opt, high)):
            if not a <= b <= c:
                errors.append(f"{t.name} dim {d}: min {a}, opt {b}, max {c}")
            if isinstance(axis, int) and not a == b == c == axis:
                errors.append(f"{t.name} dim {d} is static {axis}, profile has {a}, {b}, {c}")
    for k, which in enumerate(("min", "opt", "max")):
        sizes, sums = {}, []
        for t in inputs:
            for axis, size in zip(t.shape, profile.get(t.name, ((),) * 3)[k]):
                if isinstance(axis, str) and "+" in axis:
                    sums.append((axis, size))
                elif isinstance(axis, str) and sizes.setdefault(axis, size) != size:
                    errors.append(f"{which}: axis {axis!r} is {sizes[axis]} and {size}")
        for axis, size in sums:
            if sum(sizes[part] for part in axis.split("+")) != size:
                errors.append(f"{which}: {axis!r} is {size}, its parts {[sizes[p] for p in axis.split('+')]}")
    return errors


def test_hand_derived_profiles_obey_tensorrt_rules(decoder_spec):
    """The expected values themselves satisfy the rules, and stay within the position table."""
    for profile in (CONTEXT, GENERATION):
        assert _tensorrt_profile_errors(decoder_spec.inputs, profile) == []
        assert profile["attention_mask"][2][1] <= POSITIONS  # the longest mask: past + text within the table
    assert CONTEXT["soft_prompt"][0][1] == NQ and GENERATION["soft_prompt"][2][1] == 0  # queries only at prefill
    assert CONTEXT["input_ids"][0] == (1, NQ + 1) and CONTEXT["input_ids"][2] == (MAX_BATCH, NQ + MAX_PROMPT)
    assert GENERATION["past_key_0"][2][2] == NQ + MAX_PROMPT + MAX_NEW - 1 == LONGEST_PAST
    assert NQ + MAX_PROMPT + MAX_NEW == POSITIONS and CONTEXT["input_ids"][2][1] == LONGEST_PROMPT
    broken = {**GENERATION, "attention_mask": ((1, 2), (1, 21), (8, 129))}  # the rules can fail
    assert _tensorrt_profile_errors(decoder_spec.inputs, broken) == ["max: 'past+text' is 129, its parts [127, 1]"]


def test_every_graph_profile_obeys_tensorrt_rules(tiny_specs):
    assert set(tiny_specs) >= {"vision", "qformer_query", "qformer_text", "qformer_itm", "llm_decoder"}
    for name, spec in tiny_specs.items():
        profiles = spec.trt_profiles()
        assert profiles, name
        for p, profile in enumerate(profiles):
            assert _tensorrt_profile_errors(spec.inputs, profile) == [], (name, p)


def test_decoder_spec_has_the_hand_derived_profiles(decoder_spec):
    assert decoder_spec.trt_profiles() == [CONTEXT, GENERATION]


def test_prefill_picks_profile_0_and_steps_profile_1(decoder_spec):
    ranges = decoder_spec.trt_profiles()
    for sizes in decoder_spec.check_sizes:
        expected = 0 if sizes["past"] == 0 else 1
        assert pick_profile(_shapes(decoder_spec, sizes), ranges) == expected, sizes
    for sizes, expected in (({"batch": 8, "text": 1, "past": LONGEST_PAST, "queries": 0}, 1),  # the edges
                            ({"batch": 1, "text": 1, "past": 1, "queries": 0}, 1),
                            ({"batch": 8, "text": LONGEST_PROMPT, "past": 0, "queries": NQ}, 0),
                            ({"batch": 1, "text": NQ + 1, "past": 0, "queries": NQ}, 0)):
        assert pick_profile(_shapes(decoder_spec, sizes), ranges) == expected, sizes
        assert pick_profile(_shapes(decoder_spec, sizes), [CONTEXT, GENERATION]) == expected, sizes


def test_out_of_range_names_input_range_and_build_flag(decoder_spec):
    ranges, axes = decoder_spec.trt_profiles(), decoder_spec.dynamic_axes()
    with pytest.raises(ValueError) as e:  # batch above --max-batch (8)
        pick_profile(_shapes(decoder_spec, {"batch": 9, "text": NQ + 2, "past": 0, "queries": NQ}), ranges, axes,
                     graph="llm_decoder")
    msg = str(e.value)
    assert "'input_ids' [9, " in msg and "axis 'batch' is 9, allowed 1..8" in msg and "--max-batch" in msg
    assert "profile 0" in msg and "profile 1" in msg

    with pytest.raises(ValueError, match="(?s)axis 'text' is 67, allowed 5..66.*--max-prompt-tokens"):
        pick_profile(_shapes(decoder_spec, {"batch": 1, "text": LONGEST_PROMPT + 1, "past": 0, "queries": NQ}),
                     ranges, axes)

    with pytest.raises(ValueError, match="(?s)axis 'past' is 128, allowed 1..127.*--max-new-tokens"):
        pick_profile(_shapes(decoder_spec, {"batch": 1, "text": 1, "past": LONGEST_PAST + 1, "queries": 0}), ranges,
                     axes)

    with pytest.raises(ValueError, match="--max-batch"):  # without axis names, dim 0 is the batch
        pick_profile(_shapes(decoder_spec, {"batch": 9, "text": 1, "past": 3, "queries": 0}), ranges)


# ---------------------------------------------------------------- device tensors and the runner, on the fakes
def test_device_tensor_round_trip_views_and_gather(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(trt_runner, "_CUDA", cuda)
    host = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    t = DeviceTensor.from_numpy(host)
    assert t.shape == (4, 2, 3) and t.dtype == np.float32 and len(t) == 4
    np.testing.assert_array_equal(t.numpy(), host)
    np.testing.assert_array_equal(np.asarray(t), host)

    allocations = len(cuda.mem)
    view = t[1:3]  # contiguous rows: no allocation, no copy
    assert len(cuda.mem) == allocations and view.ptr == t.ptr + 24
    np.testing.assert_array_equal(view.numpy(), host[1:3])

    index = np.array([3, 3, 0, -1])
    gathered = t[index]  # beam reordering: device-to-device copies only
    np.testing.assert_array_equal(gathered.numpy(), host[index])
    assert "htod" not in cuda.copies[1:] and cuda.copies.count("dtod") == 4
    with pytest.raises(IndexError):
        t[np.array([4])]
    with pytest.raises(TypeError):
        t[np.array([0.5])]

    del t  # the view keeps the memory alive; it goes with the last reference
    np.testing.assert_array_equal(view.numpy(), host[1:3])
    del view, gathered
    assert cuda.mem == {}
    assert DeviceTensor.from_numpy(np.zeros((2, 0, 3), np.float32)).ptr == 0  # empty: nothing allocated


class ToyDecoder(CachedDecoder):
    def __init__(self, runner):
        super().__init__(runner, num_layers=1)
        self.cache.past_names, self.cache.present_names = ["past_key_0"], ["present_key_0"]  # the toy has keys only

    def prefill(self, input_ids):
        self.cache.arrays = [np.zeros((input_ids.shape[0], 0), np.float32)]
        self.attention_mask = np.ones(input_ids.shape, np.int64)
        return self._run(input_ids, {})


def test_runner_keeps_kv_cache_on_device_across_profiles(fake_gpu):
    cuda, plan, _ = fake_gpu
    runner = make_runner(plan, backend="tensorrt")
    assert isinstance(runner, TrtRunner)
    assert runner.input_names == ["input_ids", "attention_mask", "position_ids", "past_key_0"]
    assert runner.output_names == ["logits", "present_key_0"]
    engine, contexts = runner.engine, runner._contexts
    assert [c.profile for c in contexts] == [0, 1]  # one context per optimization profile

    dec = ToyDecoder(runner)
    logits = dec.prefill(np.array([[1, 2, 3], [4, 5, 6]]))
    assert isinstance(logits, np.ndarray)  # not kept: copied to the host
    np.testing.assert_array_equal(logits, [6, 15])
    assert contexts[0].addresses["past_key_0"] == runner._dummy.ptr  # the empty cache still gets an address
    cache = dec.cache.arrays[0]
    assert isinstance(cache, DeviceTensor) and cache.shape == (2, 3)
    assert set(cuda.mem) == {runner._dummy.ptr, cache.ptr}  # input copies and logits were freed

    uploads = cuda.copies.count("htod")
    np.testing.assert_array_equal(dec.step(np.array([7, 8])), [13, 23])
    assert contexts[1].addresses["past_key_0"] == cache.ptr  # the cache went back in without a copy
    assert cuda.copies.count("htod") - uploads == 3 + 2  # ids, mask, positions up; the toy kernel writes 2 outputs
    assert dec.cache.arrays[0].shape == (2, 4)  # (the toy cache is [batch, past], no heads)

    dec.reorder(np.array([1, 1]))  # beam selection on the device
    np.testing.assert_array_equal(dec.cache.arrays[0].numpy(), [[4, 5, 6, 8], [4, 5, 6, 8]])
    np.testing.assert_array_equal(dec.step(np.array([9, 9])), [32, 32])
    assert engine.calls == [0, 1, 1]

    with pytest.raises(ValueError, match="--max-batch"):
        runner.run({"input_ids": np.ones((5, 3), np.int64), "attention_mask": np.ones((5, 3), np.int64),
                    "position_ids": np.ones((5, 3), np.int64), "past_key_0": np.zeros((5, 0), np.float32)})


def test_runner_casts_numpy_and_checks_device_dtype(fake_gpu):
    _, plan, _ = fake_gpu
    runner = TrtRunner(plan)
    feeds = {"input_ids": np.array([[1, 2]], np.int32), "attention_mask": np.ones((1, 2)),
             "position_ids": np.array([[0, 1]]), "past_key_0": np.zeros((1, 0))}  # int32 / float64 cast on upload
    out = runner.run(feeds, keep=["present_key_0"])
    assert out["present_key_0"].dtype == np.float32
    np.testing.assert_array_equal(out["present_key_0"].numpy(), [[1, 2]])
    wrong = DeviceTensor.from_numpy(np.zeros((1, 2), np.float64))
    with pytest.raises(ValueError, match="float64 device tensor, the engine takes float32"):
        runner.run({**feeds, "input_ids": np.array([[3]]), "attention_mask": np.ones((1, 3), np.int64),
                    "position_ids": np.array([[2]]), "past_key_0": wrong})


# ---------------------------------------------------------------- build_engine against a recording fake
class Recorder:
    def __init__(self, network_inputs, plan=b"PLAN", parse_errors=()):
        self.calls, self.network_inputs, self.plan, self.parse_errors = [], network_inputs, plan, parse_errors

    def module(self):
        rec, trt = self, types.ModuleType("tensorrt")
        trt.__version__ = "11.4.0.1"
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")

        class Err:
            def __init__(self, node, name, op, desc):
                self._n, self._name, self._op, self._desc = node, name, op, desc

            def node(self):
                return self._n

            def node_name(self):
                return self._name

            def node_operator(self):
                return self._op

            def desc(self):
                return self._desc

            def code(self):
                return "UNSUPPORTED_NODE"

        class Parser:
            def __init__(self, network, logger):
                self.errors = [Err(*e) for e in rec.parse_errors]
                self.num_errors = 0

            def parse_from_file(self, path):
                rec.calls.append(("parse_from_file", path))
                self.num_errors = len(self.errors)
                return not self.errors

            def get_error(self, i):
                return self.errors[i]

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"CACHE:" + self.data

        class Profile:
            def set_shape(self, name, low, opt, high):
                rec.calls.append(("set_shape", name, low, opt, high))

        class Config:
            """IBuilderConfig's methods as TensorRT 10.3 / 11.x name them; any other name is an AttributeError, as
            it would be on the real object. Each call is recorded (set_flag would show up here)."""

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                rec.calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                rec.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                rec.calls.append(("add_optimization_profile", profile))
                return 0

            def create_timing_cache(self, data):
                rec.calls.append(("create_timing_cache", bytes(data)))
                self.cache = Cache(bytes(data))
                return self.cache

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return self.cache

        class Network:
            num_inputs = len(rec.network_inputs)

            def get_input(self, i):
                return types.SimpleNamespace(name=rec.network_inputs[i])

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return rec.plan

        trt.Builder, trt.OnnxParser = Builder, Parser
        return trt


def test_build_engine_uses_the_spec_profiles_and_no_precision_flags(decoder_spec, monkeypatch, tmp_path):
    rec = Recorder([t.name for t in decoder_spec.inputs])
    monkeypatch.setattr(trt_build, "require_tensorrt", rec.module)
    onnx = tmp_path / "llm_decoder.onnx"
    onnx.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    info = build_engine(onnx, decoder_spec, tmp_path / "out" / "llm_decoder.engine", timing_cache_path=cache,
                        workspace_bytes=1 << 28, tf32=False)

    assert (tmp_path / "out" / "llm_decoder.engine").read_bytes() == b"PLAN"
    assert ("create_network", 1 << 1) in rec.calls  # STRONGLY_TYPED and nothing else
    assert ("parse_from_file", str(onnx)) in rec.calls
    # one profile per hand-derived entry, set_shape(name, min, opt, max) for each input before it is added
    profiles, current = [], {}
    for call in rec.calls:
        if call[0] == "set_shape":
            current[call[1]] = call[2:]
        elif call[0] == "add_optimization_profile":
            profiles, current = profiles + [current], {}
    assert profiles == [CONTEXT, GENERATION] and current == {}
    assert ("set_memory_pool_limit", "workspace", 1 << 28) in rec.calls
    assert ("clear_flag", "tf32") in rec.calls and not any(c[0] == "set_flag" for c in rec.calls)
    assert cache.read_bytes() == b"CACHE:"
    assert info["profiles"] == [{n: [list(x) for x in s] for n, s in p.items()} for p in (CONTEXT, GENERATION)]
    assert info["engine_bytes"] == 4 and info["onnx_sha256"] == trt_build.onnx_sha256(onnx)
    assert info["tensorrt"] == "11.4.0.1" and info["engine"] == "llm_decoder.engine"

    build_engine(onnx, decoder_spec, tmp_path / "again.engine", timing_cache_path=cache)
    assert ("create_timing_cache", b"CACHE:") in rec.calls  # the saved cache is loaded by the next build


def test_build_engine_reports_parser_errors_and_failed_builds(decoder_spec, monkeypatch, tmp_path):
    onnx = tmp_path / "llm_decoder.onnx"
    onnx.write_bytes(b"onnx")
    names = [t.name for t in decoder_spec.inputs]
    rec = Recorder(names, parse_errors=[(12, "/model/If_3", "If", "branch shapes differ")])
    monkeypatch.setattr(trt_build, "require_tensorrt", rec.module)
    with pytest.raises(TrtBuildError, match=r"/model/If_3 If node #12: branch shapes differ \(UNSUPPORTED_NODE\)"):
        build_engine(onnx, decoder_spec, tmp_path / "x.engine")

    monkeypatch.setattr(trt_build, "require_tensorrt", Recorder(names, plan=None).module)
    with pytest.raises(TrtBuildError, match="failed to build an engine for llm_decoder.onnx"):
        build_engine(onnx, decoder_spec, tmp_path / "x.engine")
    assert not (tmp_path / "x.engine").exists()

    monkeypatch.setattr(trt_build, "require_tensorrt", Recorder(names[:-1]).module)
    with pytest.raises(TrtBuildError, match="has no input"):
        build_engine(onnx, decoder_spec, tmp_path / "x.engine")


def test_t5_profiles_take_every_call_the_runtime_makes(make_engine):
    """T5's encoder and decoder engines get one profile each: every call the fp32 pipeline makes (prompts of
    different lengths in one batch, the first decoder step from decoder_start, later steps) fits it, and a
    source longer than --max-prompt-tokens allows is refused naming that option."""
    from export.calibration import record_feeds
    from export.parity import probe_images
    from export.specs import graph_specs
    from train.blip2.checkpoint import load_checkpoint

    ck_dir, engine = make_engine("t5")
    model = load_checkpoint(ck_dir).model
    specs = {s.name: s for s in graph_specs(model)}
    feeds = record_feeds(engine, probe_images(32, count=3))
    for name in ("llm_encoder", "llm_decoder"):
        spec, calls = specs[name], feeds[name]
        assert len(spec.profiles) == 1 and calls
        for call in calls:
            assert pick_profile({k: v.shape for k, v in call.items()}, spec.trt_profiles()) == 0
    encoder = specs["llm_encoder"]
    # T5 has no position table: --max-prompt-tokens defaults to 64 (export.specs.resolve_limits), after the queries
    longest = model.config.num_query_tokens + 64
    at_limit = encoder.make_inputs({"batch": 1, "source": longest}, np.random.default_rng(0))
    assert pick_profile({k: v.shape for k, v in at_limit.items()}, encoder.trt_profiles()) == 0
    too_long = encoder.make_inputs({"batch": 1, "source": longest + 1}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="max-prompt-tokens"):
        pick_profile({k: v.shape for k, v in too_long.items()}, encoder.trt_profiles(), encoder.dynamic_axes(),
                     graph="llm_encoder")
