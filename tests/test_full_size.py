"""The size users deploy: Salesforce/blip2-opt-2.7b's architecture, and a build whose memory stays near the
float32 weights (weights streamed in, PyTorch's copy released before ONNX Runtime opens the graphs).

The full-width, few-layer build (677M parameters, an LLM graph over 2 GB with external data) runs under
`python -m pytest -m slow`.
"""
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from transformers import Blip2ForConditionalGeneration

from export.onnx_export import export_graph
from export.specs import graph_specs
from train.blip2.checkpoint import load_checkpoint, parameter_count, safetensors_headers
from train.blip2.random_checkpoint import make_random_checkpoint
from train.blip2.model import HF_CLASS, Blip2Edge
from train.blip2.presets import PRESETS, blip2_config

ROOT = Path(__file__).resolve().parents[1]


def test_full_size_preset_has_the_published_parameter_count():
    """Salesforce/blip2-opt-2.7b's model card counts 3,744,679,936 parameters; the few-layer variant whose build is held
    to the memory target (1.5x its float32 weights), 677M."""
    config = blip2_config("blip2-opt-2.7b", image_token_index=50265)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 3_744_679_936
    config = blip2_config("blip2-opt-2.7b", image_token_index=50265, vision_layers=2, qformer_layers=2, llm_layers=6)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 677


@pytest.mark.parametrize("preset,total,llm,few_layers", [
    # Salesforce/blip2-opt-6.7b: 7.75B on its model card; its LLM is facebook/opt-6.7b's 6,658,473,984
    ("blip2-opt-6.7b", 7_752_738_304, 6_658_473_984, 689),
    # Salesforce/blip2-flan-t5-xl: 3.94B on its model card; its LLM is google/flan-t5-xl's 2,849,757,184 (the
    # untied LM head counted: transformers builds T5 tied until the checkpoint's head is loaded)
    ("blip2-flan-t5-xl", 3_942_446_592, 2_849_757_184, 429),
])
def test_full_width_presets_have_the_published_parameter_counts(preset, total, llm, few_layers):
    """The other presets users deploy, counted on the meta device; their few-layer variants (2 ViT, 2 Q-Former and
    2 LLM layers, the widths kept) are what the full-width figures are measured on."""
    untied_head = not PRESETS[preset].tie_word_embeddings

    def count(config) -> tuple[int, int]:
        with torch.device("meta"):
            model = Blip2ForConditionalGeneration(config)
        lm = model.language_model
        counted = dict(lm.named_parameters())  # (a tied head's weight is listed once, under the embeddings' name)
        untied = lm.get_output_embeddings().weight.numel() if (
            untied_head and "lm_head.weight" not in counted) else 0
        return (sum(p.numel() for p in model.parameters()) + untied,
                sum(p.numel() for p in lm.parameters()) + untied)

    assert count(blip2_config(preset, image_token_index=100)) == (total, llm)
    few = blip2_config(preset, image_token_index=100, vision_layers=2, qformer_layers=2, llm_layers=2)
    assert round(count(few)[0] / 1e6) == few_layers


@pytest.mark.parametrize("preset,options", [("tiny", {}), ("tiny-t5", {"qformer_text": True}), ("tiny", {"stage": 1})])
def test_streamed_loading_gives_what_hugging_face_loads(tmp_path, preset, options):
    """A float16 folder written by `python -m train.blip2.random_checkpoint --dtype float16`, loaded tensor by tensor,
    holds exactly the float32 weights (and generation settings) of Hugging Face's own from_pretrained."""
    folder = make_random_checkpoint(tmp_path / "ck", preset, seed=0, dtype=torch.float16, **options)
    assert {entry["dtype"] for entry in safetensors_headers(folder).values()} == {"F16"}
    ours = Blip2Edge.from_pretrained(folder).hf_model()
    theirs = HF_CLASS[2 if options.get("stage", 2) == 2 else 1].from_pretrained(folder, dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    if theirs.can_generate():
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()


def test_released_weights_are_freed_after_an_export(make_engine, tmp_path):
    """After a graph is exported, releasing the checkpoint's model frees its parameters: nothing (the exporter's
    graph rewriter included) keeps them alive, so ONNX Runtime never holds its copy beside PyTorch's."""
    ck = load_checkpoint(make_engine("tiny")[0])
    spec = next(s for s in graph_specs(ck.model) if s.name == "llm_decoder")
    weights = [weakref.ref(p) for p in ck.model.language_model.parameters()]
    export_graph(spec, ck.model, tmp_path)
    ck.release_weights()
    gc.collect()
    assert ck.model is None and not any(w() is not None for w in weights)
    ck.reload_weights()
    assert ck.model is not None and ck.hf is not None


def _build_peak(folder: Path, target: str, out: Path) -> float:
    """`python -m export.build` of `folder` at `target` in a fresh process, which must succeed: its peak resident
    set in bytes (its own rusage)."""
    proc = subprocess.Popen([sys.executable, "-m", "export.build", "--model", str(folder), "--target", target,
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_full_width_builds_stay_within_one_and_a_half_times_the_fp32_weights(tmp_path):
    """blip2-opt-2.7b's widths with 2 ViT, 2 Q-Former and 6 OPT layers (677M parameters; the LLM graph is 2.4 GB,
    stored with external data): `python -m export.build` for onnx, onnx-fp16, onnx-int8 and onnx-int4 (the reduced
    builds reuse the fp32 folder) passes its gate with a peak resident set of at most 1.5x the float32 weights (each
    process's own rusage), and writes no more than the disk check asked to be free."""
    from export.build import _output_bytes

    folder = tmp_path / "opt27-6l"
    subprocess.run([sys.executable, "-m", "train.blip2.random_checkpoint",
                    "--preset", "blip2-opt-2.7b", "--dtype", "float16",
                    "--vision-layers", "2", "--qformer-layers", "2", "--llm-layers", "6", "--out", str(folder)],
                   cwd=ROOT, check=True, capture_output=True)
    for target, precision in (("onnx", "fp32"), ("onnx-fp16", "fp16"), ("onnx-int8", "int8"), ("onnx-int4", "int4")):
        peak = _build_peak(folder, target, tmp_path / "engines")
        built = tmp_path / "engines" / "opt27-6l" / target
        assert (built / "llm_decoder.onnx.data").is_file()  # external data exercised (and kept by the conversions)
        if target == "onnx":
            assert (built / "llm_decoder.onnx.data").stat().st_size > 2 * 2**30
        assert peak <= 1.5 * 4 * parameter_count(folder), f"{target}: peak RSS {peak / 2**30:.2f} GiB"
        written = sum(f.stat().st_size for f in built.glob("*.onnx*"))
        assert written <= _output_bytes(folder, precision), target


@pytest.mark.slow
@pytest.mark.parametrize("preset,options,targets", [
    # Flan-T5-XL's widths with trained-like scales (T5's large activations): where an absolute fp32 bound refused.
    # Its gate passes, its memory does not yet: onnx peaked at 3.03x the float32 weights (4.84 GiB), 3.92 GiB of it
    # while torch.onnx exported the T5 graphs, before the gate ran (docs/export.md "Full size")
    pytest.param("blip2-flan-t5-xl", ["--scales", "trained"], ("onnx", "onnx-int8", "onnx-int4"),
                 marks=pytest.mark.xfail(reason="T5's export peaks at 2.5-3x its float32 weights", strict=True)),
    # OPT-6.7B's widths with 4 outlier dimensions: int8 is smoothed (export/smoothing.py)
    ("blip2-opt-6.7b", ["--outliers", "4"], ("onnx", "onnx-int8", "onnx-int4")),
])
def test_flan_t5_xl_and_opt_6_7b_widths_pass_their_gates_within_the_memory_bound(tmp_path, preset, options, targets):
    """2 ViT, 2 Q-Former and 2 LLM layers at the widths users deploy (429M and 689M parameters): every target passes
    its gate (fp32: the bound measured against float64, token-exact with generate but at float64 near-ties) within
    1.5x the float32 weights; int8 of the OPT with outliers smooths its LayerNorms."""
    from runtime.manifest import load_manifest

    folder = tmp_path / preset
    subprocess.run([sys.executable, "-m", "train.blip2.random_checkpoint",
                    "--preset", preset, "--dtype", "float16", *options,
                    "--vision-layers", "2", "--qformer-layers", "2", "--llm-layers", "2", "--out", str(folder)],
                   cwd=ROOT, check=True, capture_output=True)
    for target in targets:
        peak = _build_peak(folder, target, tmp_path / "engines")
        assert peak <= 1.5 * 4 * parameter_count(folder), target
        if target == "onnx-int8" and "--outliers" in options:
            details = load_manifest(tmp_path / "engines" / preset / target).precision.details["llm_decoder"]
            assert details["smoothing"]["layer_norms_smoothed"] == 4
