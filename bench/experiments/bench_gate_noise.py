"""The fp32 gate's bound beside what it bounds: float32 rounding (ONNX Runtime's and PyTorch's own, against float64)
and the size of a real error, per model, from the tiny presets to full widths.

    python -m train.blip2.random_checkpoint --preset tiny-t5 --scales trained --out checkpoints/t5-trained
    python -m train.blip2.random_checkpoint --preset tiny --scales trained --outliers 3 --out checkpoints/opt-outliers
    python bench/experiments/bench_gate_noise.py --models checkpoints/t5-trained checkpoints/opt-outliers \\
        [--json gate.json]

Each model is built with `python -m export.build --target onnx` (in this process, into a temporary folder unless
`--out`), so every figure is the gate's own:
  * per graph, the largest multiple of PyTorch's own float32 error (ONNX Runtime's max abs error against
    PyTorch's float64 run, over PyTorch's float32 max abs error against the same; the bound allows 10x);
  * end to end, the logits after a generated placeholder: the runtime's error and Hugging Face's own float32
    error, both against Hugging Face in float64, and the bound (10x Hugging Face's error + 1e-6 of the range);
  * a real error: the same runtime with a generated placeholder id embedded as another id (the bug the gate's
    placeholder_step case exists for), its logits error against the same bound.
"""
import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _placeholder_embedded_wrongly(engine: Path):
    """A pipeline of `engine` whose decode steps embed the image-placeholder id as the id next to it."""
    from runtime import Blip2Pipeline
    from runtime.decoder import LlmDecoder, Seq2SeqDecoder
    from runtime.manifest import load_manifest

    image_id = load_manifest(engine).llm.image_token_id
    pipe = Blip2Pipeline.from_dir(engine)
    for cls in (LlmDecoder, Seq2SeqDecoder):
        step = cls.step

        def wrong(self, tokens, step=step):
            return step(self, np.where(tokens == image_id, image_id - 1, tokens))

        cls.step = wrong
    return pipe


def measure(model: str, out: Path) -> dict:
    from export.build import build
    from export.parity import TOLERANCES, compare_end_to_end, end_to_end_reference
    from export.specs import resolve_limits
    from runtime.decoder import LlmDecoder, Seq2SeqDecoder
    from runtime.manifest import load_manifest
    from train.blip2.checkpoint import load_checkpoint, parameter_count

    engine = build(model, "onnx", out)
    parity = json.loads((engine / "parity.json").read_text())
    row = {"model": model, "parameters": parameter_count(Path(model)),
           "graphs": {g: {"x_pytorch_fp32_err": v["x_pytorch_fp32_err"], "max_rel": v["max_rel"]}
                      for g, v in parity["graphs"].items()}}
    step = parity["end_to_end"].get("placeholder_step")
    if step is None:
        return row
    ck = load_checkpoint(model)
    manifest = load_manifest(engine)
    limits = resolve_limits(ck.model, manifest.limits.max_batch, manifest.limits.max_prompt_tokens,
                            manifest.limits.max_new_tokens)  # (the build's own limits: the same prompts)
    want = end_to_end_reference(ck, limits, list(manifest.graphs))
    del ck
    saved = LlmDecoder.step, Seq2SeqDecoder.step
    try:
        wrong = compare_end_to_end(want, _placeholder_embedded_wrongly(engine), "fp32")["placeholder_step"]
    finally:
        LlmDecoder.step, Seq2SeqDecoder.step = saved
    tol = TOLERANCES["fp32"]
    logits = want["llm"]["placeholder_step"]["logits64"]
    scale = max(float(np.abs(lg[2:]).max()) for lg in logits)
    bound = tol.noise_multiple * step["logits_hf_fp32_err"] + tol.noise_floor * scale
    row["end_to_end"] = {"runtime_err": step["logits_max_abs"], "hf_fp32_err": step["logits_hf_fp32_err"],
                         "bound": bound, "bug_err": wrong["logits_max_abs"], "bug_caught": not wrong["passed"],
                         "logit_range": scale, "near_ties": {c: parity["end_to_end"][c].get("near_ties", 0)
                                                             for c in ("caption", "prompted")}}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True,
                    help="checkpoint folders (python -m train.blip2.random_checkpoint writes them)")
    ap.add_argument("--out", help="engines root (default: a temporary folder, removed at the end)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gate_noise.") as tmp:
        for model in args.models:
            print(f"--- {model}", flush=True)
            rows.append(measure(model, Path(args.out or tmp)))
    print("\nper graph: ONNX Runtime's error against float64 as a multiple of PyTorch's own float32 error "
          "(the bound: 10x)")
    for r in rows:
        graphs = ", ".join(f"{g} {v['x_pytorch_fp32_err']:.2g}x" for g, v in r["graphs"].items())
        print(f"  {Path(r['model']).name} ({r['parameters'] / 1e6:.0f}M): {graphs}")
    print("\nend to end, logits after a generated placeholder, against Hugging Face in float64:")
    print(f"  {'model':<24} {'runtime':>9} {'HF fp32':>9} {'bound':>9} {'bug':>9} {'bug/bound':>9}  near-ties")
    for r in rows:
        e = r.get("end_to_end")
        if e:
            print(f"  {Path(r['model']).name:<24} {e['runtime_err']:>9.2g} {e['hf_fp32_err']:>9.2g} {e['bound']:>9.2g} "
                  f"{e['bug_err']:>9.3g} {e['bug_err'] / e['bound']:>9.3g}  {e['near_ties']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
