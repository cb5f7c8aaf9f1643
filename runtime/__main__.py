"""Command line for the runtime (no torch needed).

    python -m runtime caption --engines engines/demo/onnx examples/*.png
    python -m runtime caption --engines engines/demo/onnx --num-beams 3 --max-new-tokens 20 photo.jpg
    python -m runtime ask --engines engines/demo/onnx --prompt "Question: what color is the circle? Answer:" img.png
    python -m runtime caption --engines engines/demo/onnx --decoder qformer img.png   # Q-Former (ITG) captions
    python -m runtime match --engines engines/demo/onnx --text "a red circle" a.png b.png   # ITM probability
    python -m runtime retrieve --engines engines/demo/onnx --text "a red circle" --k 5 gallery/*.png
    python -m runtime retrieve --engines engines/demo/onnx --image a.png --k 3 "a red circle" "a blue square"
    python -m runtime batch --engines engines/demo/onnx --task caption --input photos/ --output captions/
    python -m runtime serve --engines engines/demo/onnx --port 8000      # HTTP: POST /caption /ask /match /embed

caption/ask print one line per image: `path<TAB>text`; match prints `path<TAB>probability`;
retrieve prints a header line, then the best k candidates, best first:
`rank<TAB>itm_probability<TAB>itc_similarity<TAB>candidate` (itm_probability is - with --no-rerank).
"""
import argparse
import sys
from pathlib import Path

from runtime.errors import Blip2EdgeError


def _folder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, metavar="DIR",
                   help="engine folder written by `python -m export.build`: engines/<name>/<target>, e.g. "
                        "engines/demo/onnx")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto (default): TensorRT for a trt-* folder, else ONNX Runtime")
    p.add_argument("--providers", type=_provider_list, default=None, metavar="NAME,NAME",
                   help="ONNX Runtime execution providers, in order of preference, e.g. "
                        "CUDAExecutionProvider,CPUExecutionProvider (needs onnxruntime-gpu); default: the CPU's. "
                        "Decoder caches stay on the first one's device between steps")


def _provider_list(value: str) -> list[str]:
    from runtime.ort_runner import provider_names

    names = provider_names(value)
    if not names:
        raise argparse.ArgumentTypeError("give provider names separated by commas, e.g. CPUExecutionProvider")
    return names


def _generation_args(p: argparse.ArgumentParser) -> None:
    _folder_args(p)
    _generation_options(p)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")


def _generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (as in Hugging Face generate)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate per image (default 30, "
                   "or the engine folder's limit where it is lower)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="generate at least this many before the end "
                   "token may end the text (default 0)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    g.add_argument("--sample", action="store_true", help="sample the next token instead of taking the most likely "
                   "(greedy / beam search)")
    g.add_argument("--temperature", type=float, default=1.0, help="with --sample: < 1 sharper, > 1 flatter "
                   "(default 1)")
    g.add_argument("--top-k", type=int, default=0, help="with --sample: draw from the k most likely tokens only "
                   "(default 0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="with --sample: draw from the smallest set of tokens "
                   "whose probability reaches p (default 1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens "
                   "already in the text (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="with --sample: random seed, for repeatable samples")
    g.add_argument("--decoder", choices=["llm", "qformer"], default=None,
                   help="text decoder: the LLM (default when the folder has one) or the Q-Former's ITG mode")


def _options(args) -> dict:
    """The generation options of `args`, as Blip2Pipeline.generate takes them."""
    return dict(decoder=args.decoder, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                num_beams=args.num_beams, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _generate(pipe, args) -> list[str]:
    if args.decoder is None and "llm_decoder" not in pipe.runners:
        print(f"note: {args.engines} has no LLM (a stage-1 folder): the Q-Former's own text decoder (ITG) writes the "
              f"text" + (", continuing the prompt" if getattr(args, "prompt", None) else ""), file=sys.stderr)
    return pipe.generate(args.images, prompt=getattr(args, "prompt", None),
                         qformer_text=getattr(args, "qformer_text", None), **_options(args))


def _match(pipe, args) -> list[str]:
    probs = pipe.itm(args.images, args.text)
    return [f"{path}\t{p:.4f}" for path, p in zip(args.images, probs)]


def _retrieve(pipe, args) -> list[str]:
    if (args.text is None) == (args.image is None):
        from runtime.errors import PromptError

        raise PromptError("retrieve needs exactly one query: --text (search the images given) or --image "
                          "(search the texts given)")
    query = args.text if args.text is not None else Path(args.image)  # a str query is a text
    k = min(10, len(args.candidates)) if args.k is None else args.k
    hits = pipe.retrieve(query, args.candidates, k=k, rerank=not args.no_rerank)
    header = "rank\titm_probability\titc_similarity\t" + ("image" if args.text is not None else "text")
    return [header] + [f"{r}\t{'-' if h.itm is None else f'{h.itm:.4f}'}\t{h.itc:.4f}\t{args.candidates[h.index]}"
                       for r, h in enumerate(hits, 1)]


def _batch_args(p: argparse.ArgumentParser) -> None:
    _folder_args(p)
    p.add_argument("--task", required=True, choices=["caption", "ask", "embed"],
                   help="caption: a caption per image; ask: the answer to --prompt; embed: the ITC query features")
    p.add_argument("--input", required=True, metavar="IMAGES", help="a folder (searched recursively), a .txt file "
                   "of paths, or a .parquet / .jsonl file with a column of paths (relative paths: to the file)")
    p.add_argument("--output", required=True, metavar="OUT", help="folder of the Parquet dataset; rerun the same "
                   "command to finish a job that was stopped")
    p.add_argument("--prompt", help='with --task ask, e.g. "Question: what is shown? Answer:"')
    p.add_argument("--column", default="path", help="the column of image paths in a .parquet / .jsonl input "
                   "(default path)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each with the engine folder loaded once "
                   "(default 1; one CPU each)")
    p.add_argument("--retry-errors", action="store_true", help="do the images of the error rows in --output "
                   "again (their error rows are replaced)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch and per written file (default 8; "
                   "at most the engine's max batch is run at once)")
    p.add_argument("--ray-address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: a "
                   "local Ray instance")
    _gpus_arg(p, "worker")
    _generation_options(p)


def _missing_scale(command: str, modules: tuple) -> bool:
    """True (after one line naming the extra) when the scale extra's `modules` cannot be imported."""
    import importlib

    try:
        for name in modules:
            module = importlib.import_module(name)
            if name == "ray" and not hasattr(module, "init"):  # a folder named ray/ (Ray's session folder) here
                raise ImportError(f"`import ray` found {list(getattr(module, '__path__', []))[:1]}, not Ray; run "
                                  f"from another directory")
    except ImportError as e:
        print(f"error: `python -m runtime {command}` needs {', '.join(modules)} ({e}); install the scale extra: "
              f"pip install \".[scale]\"", file=sys.stderr)
        return True
    return False


def _batch(args) -> int:
    import signal

    if _missing_scale("batch", ("ray", "ray.data", "pyarrow")):
        return 2
    from runtime.batch import Job, run

    import runtime.batch
    from runtime.logs import show

    def interrupted(*_):  # (also asks the job to stop between batches: Ray Data's iteration can swallow it)
        runtime.batch.STOP.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)

    job = Job(engines=args.engines, task=args.task, input=args.input, output=args.output, prompt=args.prompt,
              workers=args.workers, batch_size=args.batch_size, ray_address=args.ray_address, column=args.column,
              backend=args.backend, providers=args.providers, gpus=args.gpus, retry_errors=args.retry_errors,
              options={} if args.task == "embed" else _options(args))
    try:
        show(sys.stderr)  # (the job's progress; its results are the Parquet dataset)
        result = run(job)
    except Blip2EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to finish (what is in {args.output} is kept)", file=sys.stderr)
        return 130
    print(f"{result['written']} images written to {args.output} in {result['seconds']:.1f}s"
          f" ({result['written'] / max(result['seconds'], 1e-9):.1f} images/s), {result['skipped']} already there,"
          f" {result['errors']} {'row' if result['errors'] == 1 else 'rows'} with an error", file=sys.stderr)
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    _folder_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="copies of the pipeline, one CPU each (default 1)")
    p.add_argument("--max-batch-size", type=int, default=None, help="decode rows generation runs together, and "
                   "requests /match and /embed batch, at most (default: the engine folder's max batch)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a /match or /embed request waits "
                   "for others to batch with (default 10 ms; generation needs no wait: requests join at every "
                   "step)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body; larger ones get 413 "
                   "before they are read (default 20)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest image, in pixels, read from "
                   "its header before decoding; larger ones get 413 (default 40000000)")
    p.add_argument("--max-queued", type=int, default=None, help="requests a replica holds waiting beside the "
                   "running batch; past it, 503 with Retry-After (default 4 x the batch size)")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="a request not answered within this gets "
                   "504 (default 60)")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="a body not received within this gets 408 "
                   "(default 30)")
    p.add_argument("--allowed-hosts", default=None, help="comma-separated names the Host header may carry (default: "
                   "the loopback names with a loopback --host, any name otherwise); other hosts get 421")
    p.add_argument("--image-cache-mb", type=float, default=64.0, help="soft prompts of recent images kept for their "
                   "next request (a second question skips the vision graph and the Q-Former); 0 turns it off "
                   "(default 64)")
    p.add_argument("--batching", choices=("continuous", "requests"), default="continuous", help="continuous: "
                   "requests join the running decode batch at every step, answers stream (default); requests: "
                   "whole requests batched together, as a comparison")
    p.add_argument("--ray-address", default=None, help="attach to this running Ray cluster (default: RAY_ADDRESS "
                   "if set, else a Ray instance of this command's own, which ends with it)")
    _gpus_arg(p, "replica")


def _gpus_arg(p: argparse.ArgumentParser, actor: str) -> None:
    p.add_argument("--gpus", type=float, metavar="G", help=f"GPUs each {actor} asks Ray for (default: 1 with a "
                   f"TensorRT engine folder, 0 with ONNX Runtime's; 0.5 puts two {actor}s on one GPU)")


def _serve(args) -> int:
    import signal
    import time

    asked = []

    def interrupted(*_):  # (recorded too: a KeyboardInterrupt raised inside Ray's start-up code can be swallowed)
        asked.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    printing = sys.unraisablehook

    # A KeyboardInterrupt raised where Python cannot raise it (logging's at-fork hook while Ray starts its processes)
    # is printed as "Exception ignored" with a traceback: `asked` has it, so only the one line below is printed.
    def quiet_interrupt(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            printing(unraisable)

    sys.unraisablehook = quiet_interrupt
    try:  # (Ctrl-C during the slow imports: the same one line as later)
        if _missing_scale("serve", ("ray", "ray.serve", "fastapi", "multipart")):
            return 2
        from runtime.serve import ServiceLimits, start, stop
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130

    code = 130

    def terminated(*_):  # `kill PID`, systemd, a container's stop: as Ctrl-C (Ray's handler dumps a stack), 143
        nonlocal code
        code = 143
        raise KeyboardInterrupt

    hosts = None if args.allowed_hosts is None else tuple(
        h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    limits = ServiceLimits(max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels,
                           max_queued=args.max_queued, request_timeout_s=args.request_timeout_s,
                           body_timeout_s=args.body_timeout_s, allowed_hosts=hosts,
                           image_cache_mb=args.image_cache_mb)
    signal.signal(signal.SIGTERM, terminated)
    try:
        url = start(args.engines, host=args.host, port=args.port, ray_address=args.ray_address, limits=limits,
                    replicas=args.replicas, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    backend=args.backend, providers=args.providers, gpus=args.gpus, batching=args.batching)
        signal.signal(signal.SIGTERM, terminated)  # (ray.init installs a handler of its own)
        signal.signal(signal.SIGINT, interrupted)
        if asked:
            raise KeyboardInterrupt
        print(f"serving {args.engines} on {url} (POST /caption /ask /match /embed /v1/chat/completions, GET "
              f"/health /metrics /docs /v1/models); "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except Blip2EdgeError as e:
        stop()  # (a Ray instance the command started ends with it)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stop()  # (the replicas finish the requests they hold first)
        print("stopped", file=sys.stderr)
        return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _generation_args(sub.add_parser("caption", help="caption images"))
    ask = sub.add_parser("ask", help="generate after a text prompt, e.g. a question")
    ask.add_argument("--prompt", required=True, help='e.g. "Question: what is in the picture? Answer:"')
    ask.add_argument("--qformer-text", help="also feed this text (e.g. the bare question) to the Q-Former, "
                     "so the image's soft prompt depends on it (needs the qformer_itm graph)")
    _generation_args(ask)
    match = sub.add_parser("match", help="ITM: probability that each image matches the text")
    _folder_args(match)
    match.add_argument("--text", required=True)
    match.add_argument("images", nargs="+", help="image files")
    ret = sub.add_parser("retrieve", help="two-step retrieval: ITC over all candidates, top k re-ranked by ITM")
    _folder_args(ret)
    ret.add_argument("--text", help="text query: the candidates are image files")
    ret.add_argument("--image", help="image query: the candidates are texts")
    ret.add_argument("--k", type=int, help="how many candidates to re-rank and print (default 10, or all of them "
                     "when there are fewer)")
    ret.add_argument("--no-rerank", action="store_true", help="ITC ranking only, no ITM")
    ret.add_argument("candidates", nargs="+", help="image files (with --text) or texts (with --image)")
    _batch_args(sub.add_parser("batch", help="caption, ask or embed a whole image collection with Ray Data into "
                               "a Parquet dataset (resumable; needs the scale extra)"))
    _serve_args(sub.add_parser("serve", help="an HTTP service (POST /caption /ask /match /embed, GET /health "
                               "/metrics) on Ray Serve (needs the scale extra)"))
    args = ap.parse_args(argv)
    if args.command == "batch":
        return _batch(args)
    if args.command == "serve":
        return _serve(args)

    from runtime import Blip2Pipeline

    run = {"caption": _generate, "ask": _generate, "match": _match, "retrieve": _retrieve}[args.command]
    try:
        # this process runs nothing else on ONNX Runtime: one shared thread pool is fastest (runtime.ort_runner)
        pipe = Blip2Pipeline.from_dir(args.engines, backend=args.backend, shared_pool=True, providers=args.providers)
        lines = run(pipe, args)
    except Blip2EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.command in ("caption", "ask"):
        lines = [f"{path}\t{text}" for path, text in zip(args.images, lines)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
