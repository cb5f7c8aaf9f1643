"""An HTTP service on Ray Serve (`pip install ".[scale]"`): `python -m runtime serve --engines E`.

    POST /caption  {"image": "<base64 of the file>", ...generation options}        -> {"caption": "..."}
    POST /ask      {"image": ..., "prompt": "Question: ... Answer:", ...options}   -> {"answer": "..."}
    POST /match    {"image": ..., "text": "a red circle"}                         -> {"probability": 0.93}
    POST /embed    {"image": ...}                                                 -> {"features": [[...], ...]}
    GET  /health   -> {"status": "ok"};   GET /metrics -> Prometheus text (this replica's counters)

`image` may also be a data URL (`data:image/png;base64,...`), and a body a multipart upload with the file in
field `image` (and the other fields as form fields; numbers and true/false are read as such). Requests that
arrive together are batched (`serve.batch`) up to the engine's max batch, grouped by task and options (one
`Blip2Pipeline` call per group, prompts one per image); a batched answer equals the answer to the same request
alone. A bad image, an empty or too-long prompt, an unknown or out-of-range option answer 400 with the message
the Python API gives; anything else 500, and the replica keeps serving. A path the service does not have answers
404, a method a path does not take 405.
"""
import asyncio
import base64
import io
import json
import logging
import time
from dataclasses import dataclass, field

from runtime.actors import check_cluster_gpus, gpus_per_actor
from runtime.errors import Blip2EdgeError, ImageInputError, PromptError

APP_NAME = "blip2"  # the Ray Serve application's name (serve run / serve status / serve.delete)
ROUTES = {"/caption": "caption", "/ask": "answer", "/match": "probability", "/embed": "features"}
OPTIONS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p",
           "repetition_penalty", "length_penalty", "early_stopping", "seed", "decoder")
FIELDS = {"/caption": (), "/ask": ("prompt",), "/match": ("text",), "/embed": ()}  # besides image and options
GETS = ("/health", "/metrics")


class ServeOptionError(Blip2EdgeError, ValueError):
    """The service cannot start with these options (port, replicas, batching) or on this port."""


@dataclass
class Item:
    """One request, parsed and checked: what the batch handler runs."""
    route: str
    image: object  # an RGB PIL image
    text: str | None = None  # the prompt (/ask) or the text (/match)
    options: dict = field(default_factory=dict)

    def group(self) -> tuple:
        return self.route, json.dumps(self.options, sort_keys=True)


def image_from_bytes(data: bytes):
    from PIL import Image

    from runtime.image import load_image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # noqa: BLE001 (whatever Pillow raises for a file it cannot decode)
        raise ImageInputError("field 'image' is not an image PIL can read; send the bytes of a PNG or JPEG file "
                              "(base64 in JSON, or as a multipart file upload)") from None
    return load_image(image)


def parse(route: str, body: dict) -> Item:
    """Check a request body (fields already decoded): raises a Blip2EdgeError naming the problem."""
    if route not in ROUTES:
        raise PromptError(f"unknown route {route}; POST to one of {', '.join(ROUTES)}")
    image = body.get("image")
    if image is None:
        raise ImageInputError("the request has no 'image'; send {\"image\": \"<base64 of the file>\"} or a "
                              "multipart upload with the file in field 'image'")
    if isinstance(image, str):
        if image.startswith("data:") and ";base64," in image[:100]:  # a data URL: data:image/png;base64,...
            image = image.split(",", 1)[1]
        try:
            image = base64.b64decode(image, validate=True)
        except ValueError:
            raise ImageInputError("field 'image' is not valid base64; send the file's bytes base64-encoded") from None
    wanted = FIELDS[route]
    unknown = sorted(set(body) - {"image", *wanted, *OPTIONS}) if route in ("/caption", "/ask") else \
        sorted(set(body) - {"image", *wanted})
    if unknown:
        allowed = ", ".join([*wanted, *(OPTIONS if route in ("/caption", "/ask") else ())]) or "none"
        raise PromptError(f"unknown option {unknown[0]!r} for {route}; options are: {allowed}")
    text = None
    if wanted:  # (its content is the pipeline's to check, so that the message is the Python API's)
        text = body.get(wanted[0])
        if not isinstance(text, str):
            raise PromptError(f"{route} needs a '{wanted[0]}' string")
    options = {k: body[k] for k in OPTIONS if k in body}
    return Item(route, image_from_bytes(bytes(image)), text, options)


def run_group(pipe, items: list[Item]) -> list:
    """One pipeline call for items of one group; the answer of each (a value for the JSON)."""
    route, images = items[0].route, [i.image for i in items]
    if route == "/match":
        return [float(p) for p in pipe.itm(images, [i.text for i in items])]
    if route == "/embed":
        return [f.tolist() for f in pipe.embed_images(images)]
    prompts = [i.text for i in items] if route == "/ask" else None
    return pipe.generate(images, prompt=prompts, **items[0].options)


def answer_batch(pipe, items: list[Item]) -> list:
    """Each item's answer, or the exception it alone raised: a group that fails is retried one item at a time,
    so a too-long prompt fails its own request only."""
    groups: dict[tuple, list[int]] = {}
    for n, item in enumerate(items):
        groups.setdefault(item.group(), []).append(n)
    out: list = [None] * len(items)
    for members in groups.values():
        try:
            for n, value in zip(members, run_group(pipe, [items[n] for n in members])):
                out[n] = value
        except Exception:  # noqa: BLE001 (found per item below)
            for n in members:
                try:
                    out[n] = run_group(pipe, [items[n]])[0]
                except Exception as e:  # noqa: BLE001 (answered as 400 or 500 by the caller)
                    out[n] = e
    return out


def misrouted(method: str, route: str) -> tuple[int, dict, dict] | None:
    """(404 or 405, JSON answer, headers) for a request the service has no handler for; None where it has."""
    if (method == "POST" and route in ROUTES) or (method == "GET" and route in GETS):
        return None
    if route in ROUTES or route in GETS:
        allowed = "POST" if route in ROUTES else "GET"
        return 405, {"error": f"{route} takes {allowed}, not {method}"}, {"Allow": allowed}
    return 404, {"error": f"no {route} here; POST to one of {', '.join(ROUTES)}, or GET {' or '.join(GETS)}"}, {}


def reply(route: str, value) -> tuple[int, dict]:
    """(HTTP status, JSON answer) for a request's value: its result, or the exception it raised."""
    if isinstance(value, Blip2EdgeError):
        return 400, {"error": str(value)}
    if isinstance(value, Exception):
        return 500, {"error": f"internal error: {type(value).__name__}: {value}"}
    return 200, {ROUTES[route]: value}


async def read_body(request) -> dict:
    """A JSON body, or a multipart form (file field 'image'; other fields as JSON values where they parse)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        body = {}
        for key, value in form.items():
            if hasattr(value, "read"):
                body[key] = await value.read()
            else:
                try:
                    body[key] = json.loads(value)
                except ValueError:
                    body[key] = value
        return body
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise PromptError("the body is not JSON; send {\"image\": \"<base64>\", ...} with content-type "
                          "application/json, or a multipart upload") from None
    if not isinstance(body, dict):
        raise PromptError("the body must be a JSON object such as {\"image\": \"<base64 of the file>\"}")
    return body


def build_app(engines: str, max_batch_size: int | None = None, batch_wait_ms: float = 10.0, replicas: int = 1,
              threads: int | None = None, backend: str = "auto", gpus: float | None = None):
    """The Ray Serve application (bind()-ed deployment) for `engines`; each replica asks Ray for one CPU and
    `gpus` GPUs (default: 1 for a TensorRT engine folder, else 0; `runtime.actors`)."""
    return _application(engines, max_batch_size, batch_wait_ms, replicas, threads, backend, gpus)[0]


def _application(engines: str, max_batch_size: int | None = None, batch_wait_ms: float = 10.0, replicas: int = 1,
                 threads: int | None = None, backend: str = "auto", gpus: float | None = None) -> tuple:
    """build_app's application, and the GPUs each replica asks for (start checks the cluster has them)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from ray import serve
    from starlette.responses import JSONResponse, Response

    from runtime.manifest import load_manifest

    manifest = load_manifest(engines)
    limit, per_replica = manifest.limits.max_batch, gpus_per_actor(manifest, gpus)
    batch = max_batch_size or limit
    if not 1 <= batch <= limit:
        raise ServeOptionError(f"--max-batch-size {batch} is outside 1..{limit}, the engine folder's max batch; "
                               f"rebuild with `python -m export.build --max-batch {batch}` for larger batches")
    if not (isinstance(replicas, int) and replicas >= 1):
        raise ServeOptionError(f"--replicas {replicas!r}: give 1 or more copies of the pipeline")
    if not batch_wait_ms >= 0:
        raise ServeOptionError(f"--batch-wait-ms {batch_wait_ms!r}: give 0 or more milliseconds")

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1, "num_gpus": per_replica},
                      max_ongoing_requests=4 * batch)
    class Blip2Service:
        def __init__(self):
            from runtime import Blip2Pipeline

            self.pipe = Blip2Pipeline.from_dir(engines, backend=backend, threads=threads)
            self.registry = CollectorRegistry()
            self.requests = Counter("blip2_requests", "requests answered", ["route", "status"],
                                    registry=self.registry)
            self.latency = Histogram("blip2_request_seconds", "time to answer a request", ["route"],
                                     registry=self.registry)
            self.batches = Histogram("blip2_batch_size", "requests per pipeline batch", buckets=(1, 2, 4, 8, 16, 32),
                                     registry=self.registry)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=batch_wait_ms / 1000)
        async def answer(self, items: list[Item]) -> list:
            self.batches.observe(len(items))
            return await asyncio.get_running_loop().run_in_executor(None, answer_batch, self.pipe, items)

        async def __call__(self, request):
            route, started = request.url.path.rstrip("/") or "/", time.perf_counter()
            wrong = misrouted(request.method, route)
            if wrong:  # (counted under one label: any path a client sends would otherwise add a series)
                self.requests.labels("other", str(wrong[0])).inc()
                return JSONResponse(wrong[1], status_code=wrong[0], headers=wrong[2])
            if route == "/health":
                return JSONResponse({"status": "ok"})
            if route == "/metrics":
                return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")
            try:
                value = await self.answer(parse(route, await read_body(request)))
            except Exception as e:  # noqa: BLE001 (answered below: 400 or 500, and the replica goes on)
                value = e
            status, payload = reply(route, value)
            self.requests.labels(route, str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)
            return JSONResponse(payload, status_code=status)

    return Blip2Service.bind(), per_replica


def app(args: dict):
    """The application for `serve run` and Serve config files, options as strings:
    `serve run runtime.serve:app engines=engines/demo/onnx max_batch_size=8 batch_wait_ms=10 replicas=2`."""
    kinds = {"engines": str, "max_batch_size": int, "batch_wait_ms": float, "replicas": int, "threads": int,
             "backend": str, "gpus": float}
    unknown = sorted(set(args) - set(kinds))
    if unknown or "engines" not in args:
        raise ServeOptionError(f"runtime.serve:app takes engines=DIR and optionally {', '.join(list(kinds)[1:])}"
                               + (f"; not {', '.join(unknown)}" if unknown else "; engines is missing"))
    options = {}
    for key, value in args.items():
        try:
            options[key] = kinds[key](value)
        except (TypeError, ValueError):
            raise ServeOptionError(f"runtime.serve:app: {key}={value!r} is not a{'n' * (kinds[key] is int)} "
                                   f"{kinds[key].__name__}") from None
    return build_app(**options)


def start(engines: str, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Start Ray (local unless RAY_ADDRESS is set), Ray Serve's HTTP proxy on host:port and the application."""
    import os

    if not (isinstance(port, int) and 1 <= port <= 65535):
        raise ServeOptionError(f"--port {port!r} is not a TCP port; give one in 1..65535 (default 8000)")

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    # Ray Serve marks its HTTP proxy dead when it is not ready within 5 s, three times: on a small machine that
    # is busy (2 cores, a build beside it) it is not, and the start fails. (Read by Ray's processes, which
    # inherit this environment when ray.init starts them.)
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "60")
    import ray
    from ray import serve

    application, per_replica = _application(engines, **app_options)  # (folder and options checked before Ray)
    if not ray.is_initialized():  # (else the caller's Ray, which may be a cluster's: not checked)
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        check_cluster_gpus(per_replica, app_options.get("replicas", 1), "replica")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # (its INFO lines: started, connecting, ready)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 (Ray raises its task error wrapping the proxy's RuntimeError)
        if "Failed to bind to address" in str(e):
            raise ServeOptionError(f"could not listen on {host}:{port}: the port is in use (another server, or a "
                                   f"service still running); choose another with --port") from None
        raise


def stop() -> None:
    """Delete the application and leave Ray, ignoring a second Ctrl-C meanwhile (a terminal's Ctrl-C reaches Ray's
    processes too, and its own shutdown would print a traceback when interrupted). A Ray instance that `start`
    started ends with this process; on a cluster that was already running, Ray Serve and any other application
    stay. Safe at any point of `start`, Ray still starting included. (`serve.shutdown()` would stop Serve for the
    whole cluster, and here it printed a raylet line about its controller's interrupted shutdown task.)"""
    import signal

    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)
    except RayServeException:  # Ctrl-C before Serve had started: there is nothing to delete
        pass
    finally:
        ray.shutdown()
