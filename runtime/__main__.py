"""Command line for the runtime (no torch needed).

    python -m runtime caption --engines engines/demo/onnx examples/*.png
    python -m runtime caption --engines engines/demo/onnx --num-beams 3 --max-new-tokens 20 photo.jpg
    python -m runtime ask --engines engines/demo/onnx --prompt "Question: what color is the circle? Answer:" img.png

Prints one line per image: `path<TAB>text`.
"""
import argparse
import sys

from runtime.errors import Blip2EdgeError


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, help="engine folder written by `python -m export.build`")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _generation_args(sub.add_parser("caption", help="caption images"))
    ask = sub.add_parser("ask", help="generate after a text prompt, e.g. a question")
    ask.add_argument("--prompt", required=True, help='e.g. "Question: what is in the picture? Answer:"')
    _generation_args(ask)
    args = ap.parse_args(argv)

    from runtime import Blip2Pipeline

    try:
        pipe = Blip2Pipeline.from_dir(args.engines, backend=args.backend)
        texts = pipe.generate(
            args.images, prompt=getattr(args, "prompt", None), max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens, num_beams=args.num_beams, do_sample=args.sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
    except Blip2EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, text in zip(args.images, texts):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
