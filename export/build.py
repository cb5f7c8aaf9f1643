"""Build an engine folder from a BLIP-2 checkpoint: export every graph, check it against PyTorch, write it atomically.

    python -m export.build --model models/demo --target onnx            # -> engines/demo/onnx/
    python -m export.build --model DIR --target onnx --out /data/engines --name blip2-opt
    python -m export.build --model models/demo --target onnx-fp16       # fp16 weights and compute
    python -m export.build --model models/demo --target onnx-int8 --calib-images my_images/
    python -m export.build --model models/demo --target onnx-int4        # int4 weights for the LLM
    python -m export.build --model models/demo --target trt-fp16        # on the GPU that will run it

Targets: onnx (fp32), onnx-fp16, onnx-int8, onnx-int4 (ONNX Runtime, any machine); trt-fp16, trt-int8,
trt-int4 (TensorRT engines built from the fp16 / int8 / int4 ONNX, on the GPU that will run them).
Reduced-precision graphs are checked against PyTorch on inputs recorded from the fp32 pipeline, with the
tolerances of export/parity.py, and the folder's parity.json carries an accuracy report against fp32. A
reduced build starts from the fp32 folder beside it (OUT/NAME/onnx) when that folder was exported from the
same checkpoint with the same limits and library versions, instead of exporting again.

Everything that can be checked is checked before any export starts (target, --out, the checkpoint, the
limits against the model's position table). The folder is assembled under a temporary name beside its
final place and renamed only after every graph and the end-to-end check passed, so an interrupted or
failed build leaves nothing behind, not even an empty folder.
"""
import sys

if __name__ == "__main__":  # (before the slow imports below: see export.startup)
    from export.startup import prepare

    prepare()

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from export.onnx_export import export_graph
from export.parity import (
    TOLERANCES, ParityError, as_records, check_runner, compare_end_to_end, compare_graphs, end_to_end_reference,
    graph_references, raise_on_failure, summarize,
)
from export.specs import graph_specs, resolve_limits
from runtime.backends import make_runner
from runtime.errors import Blip2EdgeError
from runtime.image import ImageProcessorConfig
from runtime.manifest import (
    FORMAT, FORMAT_VERSION, Build, LanguageModel, Manifest, Model, Precision, QFormer, load_manifest,
)
from runtime.memory import COLLECT_ABOVE_BYTES, collecting, map_large_allocations, return_freed_memory
from runtime.processes import alive
from train.blip2.checkpoint import (CheckpointError, checkpoint_hash, load_checkpoint, parameter_count, resolve_source,
                                    safetensors_headers)
from train.blip2.families import family
from train.blip2.logs import quiet_libraries

logger = logging.getLogger("export.build")  # (not __name__: `python -m export.build` runs it as __main__)


@dataclass(frozen=True)
class Target:
    precision: str  # fp32 | fp16 | int8 | int4: how the ONNX graphs are computed
    tensorrt: bool  # compile the graphs to TensorRT engines (needs TensorRT and an NVIDIA GPU)


TARGETS = {
    "onnx": Target("fp32", False),
    "onnx-fp16": Target("fp16", False),
    "onnx-int8": Target("int8", False),
    "onnx-int4": Target("int4", False),
    "trt-fp16": Target("fp16", True),
    "trt-int8": Target("int8", True),
    "trt-int4": Target("int4", True),
}


class BuildError(Exception):
    """A build could not be completed; the message says why and what to do."""


@dataclass
class Calibration:
    """Where INT8 ranges come from, and how many images the accuracy report uses."""
    images: str | None = None  # folder of images; None: the synthetic ShapesCaps train split
    count: int = 64
    seed: int = 0
    report_images: int = 16  # held-out probe images for the accuracy report against fp32


# ---------------------------------------------------------------- the manifest
def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _llm_section(ck) -> LanguageModel | None:
    if not ck.has_llm:
        return None
    cfg, t, llm = ck.config, ck.config.text_config, family(ck.config)
    return LanguageModel(
        family=llm.name, tokenizer="tokenizer.json", vocab_size=t.vocab_size, image_token_id=cfg.image_token_index,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
        prompt_prefix_ids=list(ck.prompt_prefix_ids), prompt_suffix_ids=list(ck.prompt_suffix_ids),
        **llm.shape(cfg))


def _qformer_section(ck) -> QFormer | None:
    if ck.qformer_tokenizer is None:
        return None
    q, e = ck.config.qformer_config, ck.edge
    return QFormer(
        tokenizer="qformer_tokenizer.json", vocab_size=q.vocab_size, num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads, head_dim=q.hidden_size // q.num_attention_heads,
        itc_dim=ck.config.image_text_hidden_size, itc_temperature=ck.itc_temperature,
        cls_token_id=e.cls_token_id, sep_token_id=e.sep_token_id, dec_token_id=e.dec_token_id,
        pad_token_id=e.pad_token_id)


def _manifest(ck, name: str, target: str, graphs: dict, limits, precision: Precision, tensorrt=None) -> Manifest:
    v = ck.config.vision_config
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, name=name, target=target, precision=precision,
        model=Model(stage=ck.edge.stage, num_query_tokens=ck.config.num_query_tokens,
                    image_size=v.image_size, patch_size=v.patch_size),
        limits=limits, image=ImageProcessorConfig.from_hf_dict(ck.image_processor), graphs=graphs,
        build=Build(created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    source=str(ck.path.resolve()), source_sha256=checkpoint_hash(ck.path), versions=_versions(),
                    tensorrt=tensorrt),
        llm=_llm_section(ck), qformer=_qformer_section(ck))


def _write_folder(ck, folder: Path, manifest: Manifest) -> None:
    """manifest.json and the tokenizers it names."""
    if manifest.llm:
        ck.tokenizer.backend_tokenizer.save(str(folder / manifest.llm.tokenizer))
    if manifest.qformer:
        ck.qformer_tokenizer.backend_tokenizer.save(str(folder / manifest.qformer.tokenizer))
    manifest.write(folder)


# ---------------------------------------------------------------- the steps
def _copy_graph(src: Path, dst: Path, file: str) -> None:
    """Copy an ONNX graph and its external data, if any, from folder `src` to `dst` (copied, not hard-linked: onnx
    refuses to load external data that has several hard links)."""
    for name in (file, f"{file}.data"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _reusable_fp32(folder: Path, source_sha256: str, limits, specs) -> Manifest | None:
    """The fp32 engine folder beside a reduced build, if it was exported from the same checkpoint, with the same
    limits and graphs, by the same library versions: then its graphs are what the build would export again
    (they are checked against PyTorch again all the same)."""
    if not (folder / "manifest.json").is_file():
        return None
    try:
        m = load_manifest(folder)
    except Blip2EdgeError:
        return None
    same = (m.target == "onnx" and m.format_version == FORMAT_VERSION and m.build.source_sha256 == source_sha256
            and m.limits == limits and m.build.versions == _versions() and set(m.graphs) == {s.name for s in specs})
    return m if same else None


def _export_fp32(ck, specs, folder: Path, reuse: Manifest | None = None) -> dict:
    """Every graph to fp32 ONNX in `folder` (or, with `reuse`, the graphs of that fp32 folder copied in); returns
    the manifest's graph entries."""
    graphs = {}
    if reuse is not None:
        logger.info(f"reusing the fp32 graphs of {reuse.folder} (same checkpoint, limits and versions)")
        for spec in specs:
            graphs[spec.name] = reuse.graphs[spec.name]
            _copy_graph(reuse.folder, folder, graphs[spec.name].file)
    for i, spec in enumerate(specs if reuse is None else [], 1):
        logger.info(f"[{i}/{len(specs)}] {spec.name}: exporting ...")
        graphs[spec.name] = spec.to_manifest(export_graph(spec, ck.model, folder).name)
    return graphs


def _references(ck, specs, limits, precision: str, feeds: dict | None = None, large_input: bool = False,
                images: list | None = None, end_to_end: bool = True):
    """PyTorch's outputs for every graph's check cases and Hugging Face's for the end-to-end gate, computed with
    the weights loaded; the PyTorch weights are released afterwards, so that the checks against ONNX Runtime
    never hold both copies (peak memory about the float32 weights once)."""
    ck.reload_weights()
    logger.info("reference outputs with PyTorch and Hugging Face ...")
    graphs = graph_references(specs, ck.model, feeds, large_input, precision)
    e2e = (end_to_end_reference(ck, limits, [s.name for s in specs], images, float64=precision == "fp32")
           if end_to_end else None)
    ck.release_weights()
    return graphs, e2e


def _convert(specs, src: Path, dst: Path, precision: str, ranges: dict | None, for_tensorrt: bool) -> dict:
    """fp32 ONNX graphs in `src` -> reduced-precision graphs in `dst`; returns per-graph precision details.
    INT8 graphs for ONNX Runtime store activations as uint8 (the same values; see export.int8); INT4 is
    weight-only, for the graphs whose spec asks for it (the LLM's), the others are copied in fp32."""
    from export.fp16 import to_fp16
    from export.int4 import to_int4
    from export.int8 import to_int8

    details = {}
    for spec in specs:
        file = f"{spec.name}.onnx"
        if precision == "fp16":
            details[spec.name] = to_fp16(src / file, dst / file, **spec.fp16)
        elif precision == "int8":
            details[spec.name] = to_int8(src / file, dst / file, ranges[spec.name],
                                         uint8_activations=not for_tensorrt, **spec.int8)
        elif spec.int4:
            details[spec.name] = to_int4(src / file, dst / file, for_tensorrt=for_tensorrt)
        else:
            _copy_graph(src, dst, file)
            details[spec.name] = {"kept_fp32": "the whole graph"}
        return_freed_memory()
        logger.info(f"  {spec.name}: {_conversion_line(precision, details[spec.name])}")
    return details


def _conversion_line(precision: str, details: dict) -> str:
    """One line of the build's output for a converted graph: what was converted and what kept in float32."""
    kept, smoothing = details["kept_fp32"], details.get("smoothing")
    if isinstance(kept, str):
        line = f"float32 ({kept}: {precision} applies to the LLM's weights)"
    else:
        parts = [f"{n} {what}" for what, n in kept.items() if n]
        line = precision + (f"; kept in float32: {', '.join(parts)}" if parts else "")
    if smoothing:
        line += (f"; {smoothing['layer_norms_smoothed']} LayerNorm(s) with outlier channels smoothed into the "
                 f"weights (alpha {smoothing['alpha']:g})")
    return line


def _reduce(ck, specs, fp32_dir: Path, out: Path, precision: str, calibration: Calibration, for_tensorrt: bool):
    """Run the fp32 pipeline on real images (int8: measuring the activation ranges to quantize; for the gate:
    recording feeds of held-out images) and convert every graph; returns (Precision, the gate's recorded feeds
    per graph, the calibration ImageSet)."""
    from export.calibration import calibration_images, record_feeds, record_ranges
    from export.parity import GATE_TEXTS, select_cases
    from export.int8 import int8_plan_of

    data = calibration_images(calibration.images, ck.config.vision_config.image_size, calibration.count,
                              calibration.seed, calibration.report_images)
    ranges, record = None, None
    if precision == "int8":
        logger.info(f"calibrating on {data.source['count']} images from {data.source['source']} ...")
        plans = {spec.name: int8_plan_of(fp32_dir / f"{spec.name}.onnx", **spec.int8) for spec in specs}
        ranges = record_ranges(fp32_dir, {g: p.tensors for g, p in plans.items()}, data.images, data.texts,
                               channels={g: list(p.channels) for g, p in plans.items()})
        record = {**data.source, "method": "minmax", "tensors": {g: len(p.tensors) for g, p in plans.items()}}
    # the gate's inputs: held-out images of the same kind, at batch 3 and batch 1
    texts = data.held_out_texts or GATE_TEXTS
    gate = record_feeds(fp32_dir, data.held_out[:3], texts[:3])
    for g, f in record_feeds(fp32_dir, data.held_out[3:], texts[3:4]).items():
        gate[g] += f
    gate = {g: select_cases(f) for g, f in gate.items()}  # only the calls the gate checks are kept (KV caches)
    logger.info(f"converting to {precision}:")
    details = _convert(specs, fp32_dir, out, precision, ranges, for_tensorrt)
    return Precision(precision, details, record), gate, data


def _engines(specs, folder: Path, graphs: dict) -> dict:
    """Build one TensorRT engine per graph of `folder` (profiles from its spec) in place of its ONNX file;
    returns the build's tensorrt record (hardware and engines). `graphs` entries are updated to the engines."""
    from export.trt_build import build_engine, hardware_info

    cache = folder / "timing.cache"
    built = {}
    for spec in specs:
        engine = folder / f"{spec.name}.engine"
        logger.info(f"  {spec.name}: building TensorRT engine ...")
        built[spec.name] = build_engine(folder / f"{spec.name}.onnx", spec, engine, timing_cache_path=cache)
        graphs[spec.name] = replace(graphs[spec.name], file=engine.name)
    for spec in specs:
        (folder / f"{spec.name}.onnx").unlink(missing_ok=True)
        (folder / f"{spec.name}.onnx.data").unlink(missing_ok=True)
    return {**hardware_info(), "engines": built}


def _check_and_record(ck, folder: Path, manifest: Manifest, results: list, want: dict, data=None,
                      fp32_dir: Path | None = None) -> Manifest:
    """End-to-end check of the finished folder against `want` (parity.end_to_end_reference); writes parity.json
    and the manifest's parity summary (and, for a reduced precision, the accuracy report against the fp32
    folder). Raises BuildError on a failure."""
    from runtime import Blip2Pipeline

    from export.accuracy import accuracy_report, pipeline_outputs

    backend = "tensorrt" if manifest.is_tensorrt else "onnxruntime"
    if data is not None:  # the fp32 folder's outputs first, its pipeline closed before the reduced one opens
        fp32_outputs = pipeline_outputs(Blip2Pipeline.from_dir(fp32_dir, runner_factory=check_runner), data.report)
        return_freed_memory()
    logger.info("end-to-end: runtime pipeline vs Hugging Face ...")
    factory = None if manifest.is_tensorrt else check_runner
    pipe = Blip2Pipeline.from_dir(folder, backend=backend, runner_factory=factory)
    e2e = compare_end_to_end(want, pipe, manifest.precision.name)
    summaries = {c: r["summary"] for c, r in e2e.items() if isinstance(r, dict) and "summary" in r}
    for case, summary in summaries.items():
        logger.info(f"end-to-end {case}: {summary}")
    parity = {"tolerance": {"precision": manifest.precision.name, **asdict(TOLERANCES[manifest.precision.name])},
              "graphs": summarize(results), "checks": as_records(results), "end_to_end": e2e}
    if data is not None:
        parity["accuracy"] = accuracy_report(fp32_outputs, pipeline_outputs(pipe, data.report), len(data.report),
                                             data.source["report"])
        logger.info(f"accuracy against fp32: {parity['accuracy']['summary']}")
    (folder / "parity.json").write_text(json.dumps(parity, indent=2))
    if not e2e["passed"]:
        failed = {c: r["summary"] for c, r in e2e.items() if isinstance(r, dict) and not r.get("passed", True)}
        raise BuildError(f"end-to-end check failed, the runtime pipeline disagrees with Hugging Face: {failed}. "
                         f"No engine folder was written.")
    summary = {"graphs": parity["graphs"], "end_to_end": summaries, "passed": True}
    if "accuracy" in parity:
        summary["accuracy"] = parity["accuracy"]["summary"]
    manifest = replace(manifest, parity=summary)
    manifest.write(folder)
    return manifest


# ---------------------------------------------------------------- the build
def _check_calibration_fits(model_dir: Path, calibration: Calibration, target: str) -> None:
    """INT8 ranges from synthetic ShapesCaps shapes fit a model trained on them (the demo recipe's checkpoints, which
    hold recipe.json) or random weights (train.blip2.random_checkpoint's, which hold random_weights.json), and nothing
    else: a model of natural images calibrated on them gets ranges its inputs exceed, and its gate and accuracy report,
    which use the same kind of images, would pass while saying nothing about its real inputs."""
    from train.blip2.random_checkpoint import RANDOM_MARK

    if calibration.images is not None or any((model_dir / f).is_file() for f in ("recipe.json", RANDOM_MARK)):
        return
    raise BuildError(f"--target {target} calibrates INT8 ranges on images, and this checkpoint was not trained on the "
                     f"synthetic ShapesCaps shapes that are the default: pass --calib-images DIR, a folder of 64 or "
                     f"more images like the ones the deployment will see (photos for a model of photos), which also "
                     f"give the gate and the accuracy report their held-out images")


def _check_request(target: str, out_root: Path) -> None:
    """What can be refused before the checkpoint is even read."""
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    for folder in (out_root, *out_root.parents):
        if folder.exists() and not folder.is_dir():
            raise BuildError(f"--out {out_root}: {folder} is a file, not a folder; pass a folder for the engines "
                             f"(e.g. --out engines)")
    if TARGETS[target].tensorrt:
        from export.trt_build import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as e:
            raise BuildError(f"--target {target} needs TensorRT and an NVIDIA GPU: {e}") from None


@contextlib.contextmanager
def _staging(final: Path):
    """A new folder beside `final` that becomes `final` when the block ends; on a failure or Ctrl-C it is
    removed, with every parent folder this build created. Folders get the umask's permissions, like any
    other output (tempfile.mkdtemp would make them private)."""
    created = [p for p in reversed(final.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def _remove_leftovers(final: Path) -> None:
    """Remove what a killed build of `final` left (SIGKILL, the OOM killer: no handler runs): its
    `.NAME.partial-PID-*` and `.NAME.old-PID-*` folders, only those whose process is gone."""
    for path in final.parent.glob(f".{final.name}.*-*-*"):
        match = re.fullmatch(rf"\.{re.escape(final.name)}\.(partial|old)-(\d+)-\d+", path.name)
        if not (match and path.is_dir()) or alive(int(match[2])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info(f"removed {path}, left by a build that was killed (process {match[2]} is gone)")


# Bytes per weight of a graph at each precision, measured on the full-size blip2-opt-2.7b build (int8: 1 byte per
# quantized weight, but each attention's output projection stays float32; int4: 4-bit blocks with their scales,
# 8-bit ones for the first quarter of the layers and the head); used to check the disk before a build. A reduced
# LLM graph also keeps its token embedding table in float32 for the lookup (counted apart).
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.3, "int4": 0.8}
TOKEN_TABLES = ("embed_tokens.weight", "shared.weight")  # OPT's and T5's input embedding


def _part_parameters(model_dir: Path) -> tuple[int, int, int, int]:
    """(vision, LLM with its input projection, the LLM's token embedding table, all) parameter counts, from the
    safetensors headers alone."""
    sizes = {name: math.prod(h["shape"]) for name, h in safetensors_headers(model_dir).items()}
    vision = sum(n for name, n in sizes.items() if name.startswith("vision_model."))
    llm = {name: n for name, n in sizes.items() if name.startswith(("language_model.", "language_projection."))}
    table = sum(n for name, n in llm.items() if name.endswith(TOKEN_TABLES))
    return vision, sum(llm.values()), table, sum(sizes.values())


def _output_bytes(model_dir: Path, precision: str) -> float:
    """Bytes a build writes at most, from the parameter counts in the checkpoint's safetensors headers: the float32
    graphs (kept while a reduced build converts and checks), each Q-Former graph with its own copy of the Q-Former
    (up to 6 with the Q-Former's text side: query, text, itm, itm_one_text, itm_one_image, itg), plus the reduced
    graphs (int4 applies to the LLM only), with 2% and 16 MB for the graphs' structure."""
    from transformers import Blip2Config

    from train.blip2.model import EdgeConfig

    vision, llm, table, total = _part_parameters(model_dir)
    copies = 6 if EdgeConfig.load(model_dir, Blip2Config.from_pretrained(model_dir)).qformer_text else 1
    weights = vision + llm + copies * (total - vision - llm)
    need = 4.0 * weights
    if precision != "fp32":
        need += BYTES_PER_WEIGHT[precision] * llm + BYTES_PER_WEIGHT[precision if precision != "int4" else "fp32"] * (
            weights - llm)
        if precision in ("int8", "int4"):
            need += 4.0 * table
    return 1.02 * need + 16e6  # (measured on the 677M blip2-opt-2.7b variant: the fp32 graphs are 0.994x 4 * weights)


def _check_disk(model_dir: Path, target: str, out_root: Path) -> None:
    """Refuse a build the output disk cannot hold, before anything is loaded or written."""
    if not (model_dir / "config.json").is_file():
        return  # (load_checkpoint says what is wrong with the folder)
    precision = TARGETS[target].precision
    need = _output_bytes(model_dir, precision)
    where = next(p for p in (out_root, *out_root.parents, Path(".")) if p.exists())
    free = shutil.disk_usage(where).free
    if free < need:
        raise BuildError(f"not enough disk for --target {target}: the build writes up to {need / 1e9:.2f} GB "
                         f"(the float32 graphs{'' if precision == 'fp32' else f' and the {precision} ones'}) under "
                         f"{out_root} and {where.resolve()} has {free / 1e9:.2f} GB free; free some space or pass "
                         f"--out a folder on a disk with room")


def _replace(tmp: Path, final: Path) -> None:
    """Move the finished folder into place; an older folder of the same name is removed only after that."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(model_dir, target: str = "onnx", out_root="engines", name: str | None = None,
          calibration: Calibration | None = None, max_batch: int = 8, max_prompt_tokens: int | None = None,
          max_new_tokens: int | None = None) -> Path:
    """Export, check and write `out_root/<name>/<target>/`; returns the folder. Raises BuildError, CheckpointError,
    LimitError (a ValueError) or ParityError, and then leaves nothing under `out_root`."""
    out_root, source = Path(out_root), model_dir
    _check_request(target, out_root)
    if TARGETS[target].precision != "fp32":
        from export.calibration import check_calibration

        cal = calibration or Calibration()
        check_calibration(cal.images, cal.count, cal.report_images)
    model_dir = resolve_source(source)  # a hub id ('Salesforce/blip2-opt-2.7b'): its snapshot in the local cache
    if TARGETS[target].precision == "int8":
        _check_calibration_fits(model_dir, calibration or Calibration(), target)
    precision, tensorrt = TARGETS[target].precision, TARGETS[target].tensorrt
    default_name = model_dir.resolve().name if model_dir == Path(source) else str(source).split("/")[-1]
    final = out_root / (name or default_name) / target
    _check_disk(model_dir, target, out_root)
    started = time.time()
    weight_bytes = parameter_count(model_dir) * 4  # 0 without safetensors files: then collect, to be safe
    with collecting(weight_bytes == 0 or weight_bytes >= COLLECT_ABOVE_BYTES):
        return _build(model_dir, target, final, precision, tensorrt, calibration, max_batch,
                      max_prompt_tokens, max_new_tokens, started)


def _build(model_dir, target, final, precision, tensorrt, calibration, max_batch, max_prompt_tokens,
           max_new_tokens, started) -> Path:
    if final.exists():
        logger.info(f"{final} exists: the new folder replaces it once it has passed its checks (a failed or "
                    f"interrupted build leaves it as it is)")
    logger.info(f"loading checkpoint {model_dir}")
    ck = load_checkpoint(model_dir)
    limits = resolve_limits(ck.model, max_batch, max_prompt_tokens, max_new_tokens)
    specs = graph_specs(ck.model, limits)
    with _staging(final) as tmp:
        fp32_dir = tmp / "fp32" if precision != "fp32" else tmp  # a reduced build starts from the checked fp32 graphs
        fp32_dir.mkdir(exist_ok=True)
        reuse = None if precision == "fp32" else _reusable_fp32(final.parent / "onnx", checkpoint_hash(ck.path),
                                                                limits, specs)
        graphs = _export_fp32(ck, specs, fp32_dir, reuse)
        fp32 = _manifest(ck, final.parent.name, "onnx", graphs, limits, Precision("fp32"))
        references, want = _references(ck, specs, limits, "fp32", end_to_end=precision == "fp32")
        logger.info("parity of the fp32 ONNX graphs against PyTorch:")
        results = compare_graphs(references, lambda g: check_runner(fp32_dir / graphs[g].file), TOLERANCES["fp32"])
        del references  # (PyTorch's outputs and their inputs, KV caches included: gigabytes at full size)
        return_freed_memory()
        raise_on_failure(results)
        _write_folder(ck, fp32_dir, fp32)
        if precision == "fp32":
            _check_and_record(ck, tmp, fp32, results, want)
        else:
            details, feeds, data = _reduce(ck, specs, fp32_dir, tmp, precision, calibration or Calibration(),
                                           tensorrt)
            hardware = _engines(specs, tmp, graphs) if tensorrt else None
            manifest = _manifest(ck, final.parent.name, target, graphs, limits, details, hardware)
            _write_folder(ck, tmp, manifest)
            references, want = _references(ck, specs, limits, precision, feeds, large_input=precision == "fp16",
                                           images=data.held_out)
            logger.info(f"parity of the {target} graphs against PyTorch ({precision} tolerances):")
            results = compare_graphs(references, _open_runners(manifest, tmp), precision)
            del references, feeds
            return_freed_memory()
            raise_on_failure(results)
            _check_and_record(ck, tmp, manifest, results, want, data, fp32_dir)
            shutil.rmtree(fp32_dir)
    logger.info(f"wrote {final} in {time.time() - started:.0f}s")
    return final


def _open_runners(manifest: Manifest, folder: Path):
    """graph name -> runner over the folder's file for it, on the folder's backend."""
    if manifest.is_tensorrt:
        return lambda g: make_runner(folder / manifest.graphs[g].file, "tensorrt", build_info=manifest.build.tensorrt)
    return lambda g: check_runner(folder / manifest.graphs[g].file)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m export.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID",
                    help="checkpoint folder (a Hugging Face save_pretrained BLIP-2: Blip2ForConditionalGeneration "
                         "with OPT or T5, or Blip2ForImageTextRetrieval), e.g. models/demo; or a hub id such as "
                         "Salesforce/blip2-opt-2.7b, read from the Hugging Face cache (HF_HUB_OFFLINE=1: the cache "
                         "only)")
    ap.add_argument("--target", default="onnx", choices=list(TARGETS), help="what to build (default: onnx, fp32)")
    ap.add_argument("--out", default="engines", metavar="DIR",
                    help="root folder; the build goes to OUT/NAME/TARGET (default: engines)")
    ap.add_argument("--name", help="engine name (default: the checkpoint folder's name)")
    ap.add_argument("--max-batch", type=int, default=8, help="largest batch the engines must serve (default 8)")
    ap.add_argument("--max-prompt-tokens", type=int, help="longest text prompt in tokens, BOS included "
                    "(default: up to 64, as the LLM's position table allows)")
    ap.add_argument("--max-new-tokens", type=int, help="most tokens generated per call (default: up to 64)")
    cal = ap.add_argument_group("reduced precision (onnx-int8, trt-int8; the accuracy report of every reduced target)")
    cal.add_argument("--calib-images", metavar="DIR", help="folder of images like the deployment's, to calibrate "
                     "INT8 ranges on (default: synthetic ShapesCaps images)")
    cal.add_argument("--calib-count", type=int, default=64, help="calibration images used (default 64)")
    cal.add_argument("--calib-seed", type=int, default=0, help="seed of the synthetic calibration images (default 0)")
    cal.add_argument("--report-images", type=int, default=16,
                     help="held-out images for the greedy token agreement with fp32 (default 16)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    quiet_libraries()
    map_large_allocations()  # (freed weights go back to the system at once; the process is the build's)
    try:
        build(args.model, args.target, args.out, args.name,
              calibration=Calibration(args.calib_images, args.calib_count, args.calib_seed, args.report_images),
              max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    except (BuildError, CheckpointError, ParityError, Blip2EdgeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, a folder removed under the build, a concurrent build into one --out
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; no engine folder was written (free disk space, or give each build "
              f"its own --out or --name)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no engine folder was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
