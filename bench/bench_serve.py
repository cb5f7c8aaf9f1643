"""Load test of `python -m runtime serve` on this machine only (127.0.0.1): 200 caption requests from 16
concurrent clients, with dynamic batching against one request at a time.

    pip install ".[scale]"
    python -m export.build --model models/demo --target onnx
    python bench/bench_serve.py                     # engines/demo/onnx, 200 requests, 16 clients
    python bench/bench_serve.py --engines engines/NAME/onnx --requests 100 --clients 8

The application is deployed twice on one local Ray instance (one replica): `--max-batch-size` = the engine's max
batch with a 10 ms wait, then 1 (no batching). Each client posts JSON {"image": base64 PNG} for a ShapesCaps
image and waits for the answer before its next request; every request has a timeout (60 s) and the whole run
is bounded by the request count. Printed per setting: requests/s, latency p50 / p99, failed requests, and how
many answers differ from the Python API's caption of the same image.
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

import numpy as np  # noqa: E402

from runtime import Blip2Pipeline  # noqa: E402


def payloads(count: int) -> list[tuple[bytes, object]]:
    from train.data import ShapesCaps

    data = ShapesCaps("val", n=count, image_size=64, seed=11)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        data[i].image.save(buf, format="PNG")
        out.append((json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode(), data[i].image))
    return out


def one(url: str, body: bytes) -> tuple[float, int, str | None]:
    t0 = time.perf_counter()
    request = urllib.request.Request(f"{url}/caption", data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            caption = json.loads(r.read())["caption"]
            return time.perf_counter() - t0, r.status, caption
    except Exception:  # noqa: BLE001 (a failed request: counted)
        return time.perf_counter() - t0, 0, None


def load(url: str, bodies, clients: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: one(url, b), bodies))
    return time.perf_counter() - t0, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=str(ROOT / "engines" / "demo" / "onnx"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    from runtime.manifest import load_manifest
    from runtime.serve import APP_NAME, build_app, start, stop

    data = payloads(args.requests)
    pipe = Blip2Pipeline.from_dir(args.engines)
    want = [pipe.caption(image)[0] for _, image in data]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    max_batch = load_manifest(args.engines).limits.max_batch
    print(f"{args.requests} caption requests from {args.clients} clients, {args.engines}, 1 replica, 127.0.0.1")
    for label, batch in ((f"dynamic batching (max {max_batch}, 10 ms wait)", max_batch), ("one at a time", 1)):
        if not ray.is_initialized():
            start(args.engines, port=port, max_batch_size=batch)
        else:
            serve.run(build_app(args.engines, max_batch_size=batch), name=APP_NAME, route_prefix="/")
        one(url, data[0][0])  # warm-up
        seconds, results = load(url, [b for b, _ in data], args.clients)
        latency = np.array([r[0] for r in results]) * 1000
        failed = sum(r[1] != 200 for r in results)
        differ = sum(r[2] != w for r, w in zip(results, want) if r[1] == 200)
        print(f"{label:40s} {len(results) / seconds:6.1f} requests/s | latency p50 {np.percentile(latency, 50):6.0f} "
              f"ms, p99 {np.percentile(latency, 99):6.0f} ms | failed {failed} | answers differing from the "
              f"Python API {differ}", flush=True)
    stop()


if __name__ == "__main__":
    main()
