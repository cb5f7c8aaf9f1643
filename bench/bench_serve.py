"""Load test of `python -m runtime serve` on this machine only (127.0.0.1): continuous batching against whole-request
batching, the image cache on and off, and the engine without HTTP.

    pip install ".[scale]"
    python -m export.build --model models/demo --target onnx
    python bench/bench_serve.py                                  # engines/demo/onnx
    python bench/bench_serve.py --engines engines/NAME/onnx --requests 96 --clients 16 --json bench/results/serve.json

1. Mixed load: `--clients` closed-loop clients (each sends its next request when its answer is in) send
   `--requests` requests, half captions and half questions, `max_new_tokens` drawn from 4..32 (at most the
   folder's limit), ShapesCaps images. The same requests go to the service twice on one local Ray instance, one
   replica each time: `--batching continuous` (POST /v1/chat/completions with "stream": true: its first chunk,
   sent with the first token, gives the time to first token) and `--batching requests` (POST /caption and /ask, batched
   whole by serve.batch: the answer comes at once, so its time to first token is its latency). Printed: requests/s,
   tokens/s, latency p50/p99, time to first token p50/p99, failures, and the ratios continuous / requests.
2. The image cache: one client asks about one image 8 times in a row (different questions), cache on (64 MB) and
   off (0): the latency of questions 2..8 against the first's. The ceiling beside it: what the vision graph and
   the Q-Former cost of a request, measured alone (the cache can save that and no more).
3. The engine alone (no HTTP, no Ray), the same mixed requests: requests/s with `runtime.engine` (all submitted,
   then stepped to the end) against `Blip2Pipeline.generate` one max-batch of requests at a time (each batch
   grouped by equal options, as whole-request batching must).
Every request has a timeout (120 s) and the run is bounded by the request count.
"""
import argparse
import base64
import io
import json
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Headline, held_target, write_results  # noqa: E402

import numpy as np  # noqa: E402

QUESTIONS = ["Question: what colour is the shape? Answer:", "Question: how many shapes are there? Answer:",
             "Question: where is the circle? Answer:", "Question: is there a square? Answer:",
             "Question: what is in the picture? Answer:", "Question: what is the background? Answer:",
             "Question: which shape is largest? Answer:", "Question: what is on the left? Answer:"]


def workload(count: int, max_new: int, seed: int = 0) -> list[dict]:
    """Requests: {png, image (PIL), prompt (None: caption), max_new_tokens}."""
    from train.shapescaps.synthetic import ShapesCaps

    rng = np.random.default_rng(seed)
    data = ShapesCaps("val", n=count, image_size=64, seed=11)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        data[i].image.save(buf, format="PNG")
        out.append({"png": buf.getvalue(), "image": data[i].image,
                    "prompt": None if i % 2 == 0 else QUESTIONS[i % len(QUESTIONS)],
                    "max_new_tokens": int(rng.integers(4, min(32, max_new) + 1))})
    return out


def _post(url: str, body: dict):
    return urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode(),
                                                         headers={"content-type": "application/json"}), timeout=120)


def streamed(url: str, model: str, r: dict) -> dict:
    """One request through /v1/chat/completions, streamed: latency, time to first piece, pieces' text."""
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(r["png"])
                                                   .decode()}}]
    content += [{"type": "text", "text": r["prompt"]}] if r["prompt"] else []
    t0, first, text = time.perf_counter(), None, ""
    try:
        with _post(f"{url}/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": content}],
                                                 "max_tokens": r["max_new_tokens"], "stream": True}) as resp:
            for line in resp:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices", []):  # (the first chunk comes with the first token)
                    first = time.perf_counter() - t0 if first is None else first
                    text += choice["delta"].get("content") or ""
        latency = time.perf_counter() - t0
        return {"ok": True, "latency": latency, "ttft": latency if first is None else first, "text": text}
    except Exception:  # noqa: BLE001 (a failed request: counted)
        return {"ok": False, "latency": time.perf_counter() - t0}


def whole(url: str, r: dict) -> dict:
    """One request through /caption or /ask: the answer arrives at once (time to first token = latency)."""
    body = {"image": base64.b64encode(r["png"]).decode(), "max_new_tokens": r["max_new_tokens"]}
    route = "/caption" if r["prompt"] is None else "/ask"
    if r["prompt"]:
        body["prompt"] = r["prompt"]
    t0 = time.perf_counter()
    try:
        with _post(f"{url}{route}", body) as resp:
            answer = json.loads(resp.read())
        latency = time.perf_counter() - t0
        return {"ok": True, "latency": latency, "ttft": latency, "text": answer.get("caption", answer.get("answer"))}
    except Exception:  # noqa: BLE001
        return {"ok": False, "latency": time.perf_counter() - t0}


def closed_loop(send, requests: list, clients: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, requests))
    return time.perf_counter() - t0, results


def summary(seconds: float, results: list, tokens: list[int]) -> dict:
    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) * 1000
    ttft = np.array([r["ttft"] for r in ok]) * 1000
    return {"requests_per_s": len(ok) / seconds, "tokens_per_s": sum(tokens) / seconds,
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "failed": len(results) - len(ok)}


def line(label: str, s: dict) -> str:
    return (f"{label:24s} {s['requests_per_s']:6.2f} req/s {s['tokens_per_s']:7.1f} tok/s | latency p50 "
            f"{s['latency_p50_ms']:6.0f} p99 {s['latency_p99_ms']:6.0f} ms | first token p50 {s['ttft_p50_ms']:6.0f} "
            f"p99 {s['ttft_p99_ms']:6.0f} ms | failed {s['failed']}")


def deploy(engines: str, port: int, **options) -> str:
    import ray
    from ray import serve

    from runtime.serve import APP_NAME, ServiceLimits, build_app, start

    limits = ServiceLimits(max_queued=256, request_timeout_s=120,
                           image_cache_mb=options.pop("image_cache_mb", 64.0))
    if not ray.is_initialized():
        start(engines, port=port, limits=limits, **options)
    else:
        serve.run(build_app(engines, limits=limits, **options), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def engine_alone(pipe, requests: list) -> dict:
    from runtime.engine import GenerationEngine

    images = [r["image"] for r in requests]
    t0 = time.perf_counter()
    engine = GenerationEngine(pipe)
    handles = [engine.submit(im, r["prompt"], max_new_tokens=r["max_new_tokens"]) for im, r in zip(images, requests)]
    engine.run()
    continuous = time.perf_counter() - t0
    t0, batch = time.perf_counter(), pipe.manifest.limits.max_batch
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r["max_new_tokens"], []).append(i)
    plain = [None] * len(requests)
    for members in groups.values():
        for start in range(0, len(members), batch):
            part = members[start:start + batch]
            for i, ids in zip(part, pipe.generate_ids([images[i] for i in part], prompt=[requests[i]["prompt"]
                              for i in part], max_new_tokens=requests[part[0]]["max_new_tokens"])):
                plain[i] = ids
    batched = time.perf_counter() - t0
    differ = sum(h.tokens != p for h, p in zip(handles, plain))
    return {"engine_requests_per_s": len(requests) / continuous, "generate_requests_per_s": len(requests) / batched,
            "ratio": batched / continuous, "answers_differing": differ}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=str(ROOT / "engines" / "demo" / "onnx"))
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    ap.add_argument("--no-targets", action="store_true", help="write the figures without the targets (which are held "
                    "on the small preset) beside them: for other folders, shown for context")
    args = ap.parse_args(argv)

    from runtime import Blip2Pipeline
    from runtime.serve import stop

    pipe = Blip2Pipeline.from_dir(args.engines)
    limits = pipe.manifest.limits
    requests = workload(args.requests, limits.max_new_tokens)
    alone = [pipe.generate_ids(r["image"], prompt=r["prompt"], max_new_tokens=r["max_new_tokens"])[0]
             for r in requests]
    tokens, want = [len(ids) for ids in alone], [pipe.llm.tokenizer.decode(ids) for ids in alone]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    figures = {"engines": args.engines, "requests": args.requests, "clients": args.clients,
               "max_batch": limits.max_batch}
    print(f"{args.requests} requests (half captions, half questions, "
          f"max_new_tokens 4..{min(32, limits.max_new_tokens)})"
          f" from {args.clients} closed-loop clients, {args.engines}, 1 replica, 127.0.0.1")
    try:
        for mode in ("continuous", "requests"):
            url = deploy(args.engines, port, batching=mode)
            model = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"] \
                if mode == "continuous" else None
            send = (lambda r: streamed(url, model, r)) if mode == "continuous" else (lambda r: whole(url, r))
            send(requests[0])  # warm-up
            seconds, results = closed_loop(send, requests, args.clients)
            figures[mode] = summary(seconds, results, tokens)
            figures[mode]["answers_differing"] = sum(r["ok"] and r["text"] != w for r, w in zip(results, want))
            print(line(mode, figures[mode]) + f" | answers differing from the Python API "
                  f"{figures[mode]['answers_differing']}", flush=True)
        c, r, held = figures["continuous"], figures["requests"], not args.no_targets
        figures["ratios"] = {"requests_per_s": c["requests_per_s"] / r["requests_per_s"],
                             "ttft_p99": c["ttft_p99_ms"] / r["ttft_p99_ms"]}
        print(f"continuous / requests: {figures['ratios']['requests_per_s']:.2f}x the requests/s (target >= 1.5), "
              f"{figures['ratios']['ttft_p99']:.2f}x the p99 time to first token (target <= 0.5)")

        image = requests[0]
        for label, mb in (("cache on", 64.0), ("cache off", 0.0)):
            url = deploy(args.engines, port, batching="continuous", image_cache_mb=mb)
            model = json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"][0]["id"]
            streamed(url, model, {**requests[1], "prompt": None})  # warm-up on another image
            times = [streamed(url, model, {**image, "prompt": q, "max_new_tokens": 4})["latency"] for q in QUESTIONS]
            later = float(np.mean(times[1:]))
            figures[label] = {"first_ms": times[0] * 1000, "later_mean_ms": later * 1000, "speedup": times[0] / later}
            print(f"{label:10s} one image, 8 questions: first {times[0] * 1000:6.0f} ms, questions 2..8 "
                  f"{later * 1000:6.0f} ms ({times[0] / later:.2f}x faster)", flush=True)
        figures["cache_speedup"] = figures["cache off"]["later_mean_ms"] / figures["cache on"]["later_mean_ms"]
        pixels = pipe.encoder.pixels([image["image"]])
        t0 = time.perf_counter()
        for _ in range(8):
            pipe.llm.soft_prompt(pixels)
        vision = (time.perf_counter() - t0) / 8 * 1000
        off = figures["cache off"]["later_mean_ms"]
        figures["cache_ceiling"] = off / max(off - vision, 1e-9)
        print(f"questions 2..8, cache on against off: {figures['cache_speedup']:.2f}x faster (target >= 3); the "
              f"ceiling: vision + Q-Former take {vision:.0f} of the {off:.0f} ms a question costs without the "
              f"cache, so at most {figures['cache_ceiling']:.2f}x")
    finally:
        stop()
    figures["alone"] = engine_alone(pipe, requests)
    a = figures["alone"]
    print(f"engine alone (no HTTP): {a['engine_requests_per_s']:.2f} req/s against Blip2Pipeline.generate a batch "
          f"at a time {a['generate_requests_per_s']:.2f} req/s ({a['ratio']:.2f}x); answers differing "
          f"{a['answers_differing']}; HTTP continuous / engine alone: "
          f"{figures['continuous']['requests_per_s'] / a['engine_requests_per_s']:.2f}")
    if args.json:
        c, r, held = figures["continuous"], figures["requests"], not args.no_targets
        write_results(args.json, f"serve: {Path(args.engines).parent.name}/{Path(args.engines).name}", figures, [
            Headline("continuous / request batching: requests/s", figures["ratios"]["requests_per_s"], "x",
                     *held_target(">=", 1.5, held),
                     f"{c['requests_per_s']:.2f} against {r['requests_per_s']:.2f} requests/s, {args.clients} "
                     f"clients, {args.requests} requests"),
            Headline("continuous / request batching: p99 time to first token", figures["ratios"]["ttft_p99"], "x",
                     *held_target("<=", 0.5, held), f"{c['ttft_p99_ms']:.0f} against {r['ttft_p99_ms']:.0f} ms"),
            Headline("image cache on / off: questions 2..8 about one image", figures["cache_speedup"], "x faster",
                     *held_target(">=", 3.0, held),
                     f"the ceiling, vision + Q-Former's share of a question measured alone: "
                     f"{figures['cache_ceiling']:.2f}x"),
            Headline("engine alone / Blip2Pipeline.generate a batch at a time: requests/s", a["ratio"], "x"),
        ])


if __name__ == "__main__":
    main()
