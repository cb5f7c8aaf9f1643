"""`python -m runtime serve` under hostile input and overload, on this machine only (127.0.0.1): the replica's memory
while it is sent decompression bombs and large bodies, /health's latency meanwhile, and 96 concurrent clients.

    pip install ".[scale]"
    python -m export.build --model models/demo --target onnx
    python bench/bench_serve_limits.py                       # engines/demo/onnx, default service limits
    python bench/bench_serve_limits.py --json bench/results/serve-limits.json

One replica on a local Ray instance, warmed up with 3 ordinary requests. Then, twice, all at once from 16 clients:
16 decompression bombs (17 KB PNGs of 12000 x 12000 1-bit pixels: 432 MB once decoded), 8 bodies of 19 MB (14 MB
of base64-encoded noise), 4 PNGs of 36 Mpx (under the 40 Mpx limit: decoded), 4 bodies declaring 48 MB. Printed:
the statuses, the replica's peak resident memory over its warmed-up size (sampled every 10 ms from /proc), the
image decoder process's peak, /health's slowest answer (polled every 100 ms). Then 96 clients post one caption
request each at once: the statuses, the slowest answer, /health's slowest, and an ordinary request afterwards.
"""
import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Headline, proc_bytes, write_results  # noqa: E402


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _post(url: str, data: bytes, timeout: float = 120) -> int | str:
    request = urllib.request.Request(f"{url}/caption", data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # (a body the service refused before it was sent: the connection closes under the client)
        return "closed early"


def _rss_mib(pid: int) -> float:
    return proc_bytes(pid, "VmRSS") / 2**20


def _parent(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


class Watch:
    """Peak RSS of the replica (and of its decoder processes) and /health's latencies, while the block runs."""

    def __init__(self, url: str, replica: int):
        self.url, self.replica, self.stop = url, replica, False
        self.base, self.peak, self.decoder_peak, self.health = _rss_mib(replica), 0.0, 0.0, []

    def __enter__(self):
        def sample():
            while not self.stop:
                self.peak = max(self.peak, _rss_mib(self.replica))
                children = [p for p in _pids("multiprocessing") if _parent(p) == self.replica]
                self.decoder_peak = max([self.decoder_peak, *(_rss_mib(p) for p in children)])
                time.sleep(0.01)

        def health():
            while not self.stop:
                t0 = time.perf_counter()
                try:
                    urllib.request.urlopen(f"{self.url}/health", timeout=30).read()
                    self.health.append(time.perf_counter() - t0)
                except OSError:
                    self.health.append(float("inf"))
                time.sleep(0.1)

        self.threads = [threading.Thread(target=sample), threading.Thread(target=health)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_):
        self.stop = True
        for t in self.threads:
            t.join()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=str(ROOT / "engines" / "demo" / "onnx"))
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE (bench/results/*.json: bench/report.py)")
    args = ap.parse_args(argv)
    from PIL import Image

    from runtime.serve import start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(args.engines, port=port)
    try:
        replica = _pids("ServeReplica:blip2")[0]
        small = json.dumps({"image": base64.b64encode(_png(Image.new("RGB", (64, 48), (20, 200, 10)))).decode(),
                            "max_new_tokens": 12}).encode()
        for _ in range(3):
            assert _post(url, small) == 200
        bomb = json.dumps({"image": base64.b64encode(_png(Image.new("1", (12000, 12000)))).decode()}).encode()
        large = json.dumps({"image": base64.b64encode(os.urandom(14 * 2**20)).decode()}).encode()
        big = json.dumps({"image": base64.b64encode(_png(Image.new("1", (6000, 6000)))).decode()}).encode()
        huge = b'{"image": "' + b"A" * (48 * 2**20) + b'"}'
        figures = {"hostile": []}
        for run in (1, 2):
            with Watch(url, replica) as watch, ThreadPoolExecutor(16) as pool:
                statuses = Counter(pool.map(lambda d: _post(url, d),
                                            [bomb] * 16 + [large] * 8 + [big] * 4 + [huge] * 4))
            row = {"statuses": {str(k): v for k, v in statuses.items()}, "replica_base_mib": round(watch.base),
                   "replica_growth_mib": round(watch.peak - watch.base), "decoder_peak_mib": round(watch.decoder_peak),
                   "health_max_s": round(max(watch.health), 3), "health_polls": len(watch.health)}
            figures["hostile"].append(row)
            print(f"hostile run {run}: {dict(statuses)} | replica {row['replica_base_mib']} MiB, peak +"
                  f"{row['replica_growth_mib']} MiB | decoder process peak {row['decoder_peak_mib']} MiB | /health "
                  f"slowest {row['health_max_s']:.3f} s over {row['health_polls']} polls", flush=True)
        with Watch(url, replica) as watch, ThreadPoolExecutor(96) as pool:
            t0 = time.perf_counter()
            answers = list(pool.map(lambda _: (_post(url, small), time.perf_counter() - t0), range(96)))
        after = _post(url, small)
        figures["overload"] = {"clients": 96, "statuses": dict(Counter(str(s) for s, _ in answers)),
                               "slowest_s": round(max(t for _, t in answers), 2),
                               "health_max_s": round(max(watch.health), 3), "after": after}
        print(f"96 concurrent clients: {dict(Counter(s for s, _ in answers))}, slowest answer "
              f"{figures['overload']['slowest_s']} s, /health slowest {figures['overload']['health_max_s']:.3f} s; "
              f"an ordinary request afterwards: {after}", flush=True)
    finally:
        stop()
    if args.json:
        hostile, overload = figures["hostile"], figures["overload"]
        name = f"service limits: {Path(args.engines).parent.name}/{Path(args.engines).name}"
        write_results(args.json, name, figures, [
            Headline("replica memory growth under hostile bodies (worst of 2 runs)",
                     max(r["replica_growth_mib"] for r in hostile), "MiB", "<=", 300,
                     "16 decompression bombs, 8 bodies of 14 MB, 4 images of 36 Mpx and 4 bodies of 48 MB at once"),
            Headline("/health during them, slowest", max(r["health_max_s"] for r in hostile), "s", "<=", 1.0),
            Headline("96 concurrent clients: requests answered neither 200 nor 503",
                     sum(v for k, v in overload["statuses"].items() if k not in ("200", "503")), "", "<=", 0,
                     f"{overload['statuses']}, slowest {overload['slowest_s']} s, then an ordinary request: "
                     f"{overload['after']}"),
        ])
    return figures


if __name__ == "__main__":
    main()
