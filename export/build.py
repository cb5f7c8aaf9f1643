"""Build an engine folder from a BLIP-2 checkpoint: export every graph, check it against PyTorch, write it atomically.

    python -m export.build --model checkpoints/demo --target onnx            # -> engines/demo/onnx/
    python -m export.build --model DIR --target onnx --out /data/engines --name blip2-opt

The folder is assembled under a temporary name beside its final place and
renamed only after every graph and the end-to-end caption check passed, so an
interrupted or failed build leaves nothing that looks like an engine folder.
"""
import argparse
import datetime
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from export.checkpoint import CheckpointError, checkpoint_hash, load_checkpoint
from export.onnx_export import export_graph
from export.parity import TOLERANCES, ParityError, as_records, check_graph, raise_on_failure, summarize
from export.specs import Limits, graph_specs
from runtime.image import ImageProcessorConfig
from runtime.manifest import FORMAT, FORMAT_VERSION

# target -> precision; None: accepted by the CLI, not built yet
TARGETS = {"onnx": "fp32", "onnx-fp16": None, "onnx-int8": None, "trt-fp16": None, "trt-int8": None}


# What the whole pipeline must reproduce, per precision: fraction of generated tokens equal to PyTorch's,
# and the largest difference allowed in ITM probabilities / ITC similarities (rankings must be identical at fp32).
E2E_REQUIRED = {"fp32": {"token_agreement": 1.0, "prob_atol": 1e-4, "sim_atol": 1e-4, "same_ranking": True}}


class BuildError(Exception):
    """A build could not be completed; the message says why and what to do."""


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _model_info(ck) -> dict:
    cfg = ck.config
    info = {"num_query_tokens": cfg.num_query_tokens, "image_size": cfg.vision_config.image_size,
            "patch_size": cfg.vision_config.patch_size, "stage": ck.model.edge.stage}
    if ck.has_llm:
        t = cfg.text_config
        info.update({
            "image_token_id": cfg.image_token_index, "vocab_size": t.vocab_size, "num_layers": t.num_hidden_layers,
            "num_heads": t.num_attention_heads, "head_dim": t.hidden_size // t.num_attention_heads,
            "llm_hidden_size": t.hidden_size, "word_embed_proj_dim": t.word_embed_proj_dim,
            "max_position_embeddings": t.max_position_embeddings,
        })
    return info


def _qformer_info(ck, limits: Limits) -> dict | None:
    """Token ids and limits of the Q-Former's text side (None when the checkpoint has none)."""
    if ck.qformer_tokenizer is None:
        return None
    q, e = ck.config.qformer_config, ck.model.edge
    return {"cls_token_id": e.cls_token_id, "sep_token_id": e.sep_token_id, "dec_token_id": e.dec_token_id,
            "pad_token_id": e.pad_token_id, "max_text_tokens": limits.max_qformer_tokens, "vocab_size": q.vocab_size,
            "num_layers": q.num_hidden_layers, "num_heads": q.num_attention_heads,
            "head_dim": q.hidden_size // q.num_attention_heads, "itc_dim": ck.config.image_text_hidden_size,
            "itc_temperature": float(ck.model.temp.detach()), "max_batch": limits.max_batch}


def end_to_end_check(ck, folder: Path, limits: Limits, precision: str) -> dict:
    """Every capability of the folder through the runtime pipeline against PyTorch (see export.e2e)."""
    from export.e2e import llm_end_to_end, qformer_end_to_end
    from runtime import Blip2Pipeline

    pipe = Blip2Pipeline.from_dir(folder, backend="onnxruntime")
    required = E2E_REQUIRED[precision]
    report = {}
    if ck.has_llm:
        report.update(llm_end_to_end(ck, pipe, limits, required))
    if ck.qformer_tokenizer is not None:
        report.update(qformer_end_to_end(ck, pipe, limits, required))
    report["required"] = required
    report["passed"] = all(r["passed"] for r in report.values() if isinstance(r, dict) and "passed" in r)
    return report


def build(model_dir, target: str = "onnx", out_root="engines", name: str | None = None,
          limits: Limits | None = None, say=print) -> Path:
    """Export, check and write `out_root/<name>/<target>/`; returns the folder. Raises BuildError/ParityError."""
    if target not in TARGETS:
        raise BuildError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    precision = TARGETS[target]
    if precision is None:
        raise BuildError(f"target {target!r} is not built yet in this version of blip2-edge (only 'onnx', fp32, "
                         f"is); build --target onnx for now")
    model_dir = Path(model_dir)
    name = name or model_dir.resolve().name
    final = Path(out_root) / name / target
    started = time.time()
    say(f"loading checkpoint {model_dir}")
    ck = load_checkpoint(model_dir)
    limits = (limits or Limits()).resolve(ck.model)
    specs = graph_specs(ck.model, limits)
    tol = TOLERANCES[precision]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.partial-", dir=final.parent))
    try:
        results, graphs = [], {}
        for i, spec in enumerate(specs, 1):
            t0 = time.time()
            say(f"[{i}/{len(specs)}] {spec.name}: exporting ...")
            path = export_graph(spec, ck.model, tmp)
            from runtime.runners import make_runner

            checks = check_graph(spec, spec.build(ck.model).eval(), make_runner(path), tol)
            results += checks
            worst = max(checks, key=lambda c: c.max_abs)
            status = "ok" if all(c.passed for c in checks) else "FAILED"
            say(f"[{i}/{len(specs)}] {spec.name}: parity {status} over {len(checks)} checks "
                f"(max abs err {worst.max_abs:.2g}) in {time.time() - t0:.1f}s")
            graphs[spec.name] = {"file": path.name, **spec.to_manifest()}
        raise_on_failure(results)
        tokenizers = {}
        if ck.tokenizer is not None:
            ck.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
            tokenizers["llm"] = "tokenizer.json"
        if ck.qformer_tokenizer is not None:
            ck.qformer_tokenizer.backend_tokenizer.save(str(tmp / "qformer_tokenizer.json"))
            tokenizers["qformer"] = "qformer_tokenizer.json"
        t = ck.config.text_config
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "target": target,
            "precision": precision,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(model_dir.resolve()), "sha256": checkpoint_hash(model_dir)},
            "graphs": graphs,
            "model": _model_info(ck),
            "generation": {
                "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
                "prompt_prefix_ids": ck.prompt_prefix_ids, "max_batch": limits.max_batch,
                "max_prompt_tokens": limits.max_prompt_tokens, "max_new_tokens": limits.max_new_tokens,
            } if ck.has_llm else None,
            "qformer": _qformer_info(ck, limits),
            "image": ImageProcessorConfig.from_hf_dict(ck.image_processor).to_dict(),
            "tokenizers": tokenizers,
            "versions": _versions(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        say("end-to-end: runtime pipeline vs the PyTorch model ...")
        e2e = end_to_end_check(ck, tmp, limits, precision)
        for case, r in e2e.items():
            if isinstance(r, dict) and "summary" in r:
                say(f"end-to-end {case}: {r['summary']}")
        parity = {"tolerance": {"precision": precision, "atol": tol.atol, "rtol": tol.rtol, "why": tol.why},
                  "graphs": summarize(results), "checks": as_records(results), "end_to_end": e2e}
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2))
        if not e2e["passed"]:
            failed = {c: r["summary"] for c, r in e2e.items() if isinstance(r, dict) and not r.get("passed", True)}
            raise BuildError(f"end-to-end check failed, the runtime pipeline disagrees with PyTorch: {failed}. "
                             f"No engine folder was written.")
        manifest["parity"] = {"graphs": parity["graphs"], "end_to_end": {
            c: r["summary"] for c, r in e2e.items() if isinstance(r, dict) and "summary" in r}, "passed": True}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {final} in {time.time() - started:.0f}s")
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Move the finished folder into place; an older folder of the same name is removed only after that."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{int(time.time())}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m export.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (Hugging Face save_pretrained BLIP-2 OPT)")
    ap.add_argument("--target", default="onnx", choices=list(TARGETS), help="what to build (default: onnx, fp32)")
    ap.add_argument("--out", default="engines", help="root folder; the build goes to OUT/NAME/TARGET (default: engines)")
    ap.add_argument("--name", help="engine name (default: the checkpoint folder's name)")
    ap.add_argument("--max-batch", type=int, default=8, help="largest batch the engines must serve (default 8)")
    ap.add_argument("--max-prompt-tokens", type=int, help="longest text prompt in tokens, BOS included "
                    "(default: up to 64, as the position table allows)")
    ap.add_argument("--max-new-tokens", type=int, help="most tokens generated per call (default: up to 64)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for noisy in ("torch.onnx", "torch._export", "torch.export", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        build(args.model, args.target, args.out, args.name,
              Limits(args.max_batch, args.max_prompt_tokens, args.max_new_tokens))
    except (BuildError, CheckpointError, ParityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
