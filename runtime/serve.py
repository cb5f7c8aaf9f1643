"""An HTTP service on Ray Serve (`pip install ".[scale]"`): `python -m runtime serve --engines E`.

    POST /caption  {"image": "<base64 of the file>", ...generation options}        -> {"caption": "..."}
    POST /ask      {"image": ..., "prompt": "Question: ... Answer:", ...options}   -> {"answer": "..."}
    POST /match    {"image": ..., "text": "a red circle"}                         -> {"probability": 0.93}
    POST /embed    {"image": ...}                                                 -> {"features": [[...], ...]}
    POST /v1/chat/completions, GET /v1/models: OpenAI-compatible (runtime/openai_api.py), streaming included
    GET  /health   -> {"status": "ok"};   GET /metrics -> Prometheus text (this replica's counters)
    GET  /docs, /openapi.json: the contract below, every field typed and bounded by the engine folder's limits

The routes are a FastAPI application behind Ray Serve's ingress (`serve.ingress`), built in each replica from its
engine folder's limits. `image` may also be a data URL (`data:image/png;base64,...`), and a body a multipart upload
with the file in field `image` (other fields as form fields, read as JSON values where they parse). Generation runs
on a continuous-batching engine (runtime/engine.py) stepped on a thread of the replica: requests join the running
decode batch at the next step and leave it when they end. /match, /embed and Q-Former captions are batched as whole
requests (`serve.batch`) up to the engine's max batch, grouped by task and options. Either way an answer equals the
answer to the same request alone (sampling included: a generator per request).

What a client can get wrong is answered with a 4xx and a message saying what to change, before any expensive work:
400 (a wrong type, a missing field, a value out of range: the Python API's message where it has one), 403 (a
browser page of another origin), 404/405, 408 (a body not sent within --body-timeout-s), 413 (a body over
--max-body-mb, an image over --max-image-pixels, checked from its header), 415 (a content type or image format the
service does not take), 421 (a Host outside --allowed-hosts: DNS rebinding). Overload is answered, not queued for
ever: past --max-queued requests waiting in a replica, 503 with Retry-After; an answer not ready within
--request-timeout-s, 504. A failure of the service itself is a 500 whose body says nothing but that (the replica's
log has the details); no response carries a server path or an exception's text.
"""
import asyncio
import contextlib
import inspect
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runtime.actors import check_cluster_gpus, gpus_per_actor
from runtime.engine import GenerationEngine
from runtime.errors import (BackendError, Blip2EdgeError, ImageFormatError, ImageInputError, ImageTooLargeError,
                            PromptError, RequestError)
from runtime.image import base64_image
from runtime.memory import trim
from runtime.openai_api import (CHAT, MODELS, chat_model, chunk, completion, error_body, finish_reason, models_list,
                                parse_chat)
from runtime.ort_runner import check_providers, provider_names
from runtime.text import TextStream

log = logging.getLogger(__name__)

APP_NAME = "blip2"  # the Ray Serve application's name (serve run / serve status / serve.delete)
ROUTES = {"/caption": "caption", "/ask": "answer", "/match": "probability", "/embed": "features",
          CHAT: "choices"}
OPTIONS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p",
           "repetition_penalty", "length_penalty", "early_stopping", "seed", "decoder")
FIELDS = {"/caption": (), "/ask": ("prompt",), "/match": ("text",), "/embed": (), CHAT: ()}  # besides image and options
GETS = ("/health", "/metrics", "/docs", "/openapi.json", MODELS)
MAX_BEAMS = 8  # beams per request (each a row of the batch): also at most the folder's max batch
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class ServeOptionError(Blip2EdgeError, ValueError):
    """The service cannot start with these options (port, replicas, batching) or on this port."""


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may cost and how long it may wait (the `runtime serve` options of the same names)."""
    max_body_mb: float = 20.0  # --max-body-mb: a larger body is refused (413) before it is read whole
    max_image_pixels: int = 40_000_000  # --max-image-pixels: checked from the image's header (413)
    max_queued: int | None = None  # --max-queued: requests waiting per replica past the running ones (None: 4 x batch)
    request_timeout_s: float = 60.0  # --request-timeout-s: 504 past it
    body_timeout_s: float = 30.0  # --body-timeout-s: a body not received within it, 408
    allowed_hosts: tuple | None = None  # --allowed-hosts: Host header names (None: any; start() fills loopback's)
    image_cache_mb: float = 64.0  # --image-cache-mb: soft prompts of recent images, reused for their next request

    def check(self) -> None:
        for name in ("max_body_mb", "max_image_pixels", "request_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ServeOptionError(f"--{name.replace('_', '-')} {value!r}: give a number above 0")
        if isinstance(self.image_cache_mb, bool) or not isinstance(self.image_cache_mb, (int, float)) \
                or not self.image_cache_mb >= 0:
            raise ServeOptionError(f"--image-cache-mb {self.image_cache_mb!r}: give 0 (no cache) or more megabytes")
        if self.max_queued is not None and not (isinstance(self.max_queued, int) and self.max_queued >= 0):
            raise ServeOptionError(f"--max-queued {self.max_queued!r}: give 0 or more requests")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


@dataclass
class Item:
    """One request, parsed and checked: what the batch handler runs."""
    route: str
    image: object  # an RGB PIL image
    text: str | None = None  # the prompt (/ask) or the text (/match)
    options: dict = field(default_factory=dict)

    def group(self) -> tuple:
        return self.route, json.dumps(self.options, sort_keys=True)


# ---------------------------------------------------------------------------------------------- the contract
def request_models(manifest, limits: ServiceLimits) -> dict:
    """{route: pydantic model} with every bound the engine folder sets (its limits, its decoders)."""
    from typing import Literal, Optional, Union

    from pydantic import ConfigDict, Field, create_model

    from runtime.text import MAX_CHARS_PER_TOKEN

    lim = manifest.limits
    new_tokens = lim.max_new_tokens or lim.max_qformer_tokens or 64
    base64_chars = 4 * (limits.max_body_bytes // 3) + 4
    image = (str, Field(min_length=1, max_length=base64_chars,
                        pattern=r"^(data:[\w/+.-]+;base64,)?[A-Za-z0-9+/]+={0,2}$",
                        description=(
        "the image file's bytes, base64-encoded (or a data URL, data:image/png;base64,...): PNG, JPEG, WebP, BMP "
        f"or GIF, at most {limits.max_image_pixels:,} pixels")))
    decoders = [d for d, present in (("llm", manifest.llm), ("qformer", "qformer_itg" in manifest.graphs)) if present]
    generation = {
        "max_new_tokens": (Optional[int], Field(None, ge=1, le=new_tokens)),
        "min_new_tokens": (Optional[int], Field(None, ge=0, le=new_tokens)),
        "num_beams": (Optional[int], Field(None, ge=1, le=min(MAX_BEAMS, lim.max_batch))),
        "do_sample": (Optional[bool], None),
        "temperature": (Optional[float], Field(None, ge=0.01, le=100, allow_inf_nan=False)),
        "top_k": (Optional[int], Field(None, ge=0, le=1_000_000)),
        "top_p": (Optional[float], Field(None, ge=1e-6, le=1)),
        "repetition_penalty": (Optional[float], Field(None, gt=0, le=100, allow_inf_nan=False)),
        "length_penalty": (Optional[float], Field(None, ge=-100, le=100, allow_inf_nan=False)),
        "early_stopping": (Optional[Union[bool, Literal["never"]]], None),
        "seed": (Optional[int], Field(None, ge=0, le=2**63 - 1)),
        "decoder": (Optional[Literal[tuple(decoders or ["llm"])]], None),
    }
    prompt_chars = (lim.max_prompt_tokens or lim.max_qformer_tokens or 64) * MAX_CHARS_PER_TOKEN
    text_chars = (lim.max_qformer_tokens or 64) * MAX_CHARS_PER_TOKEN
    config = ConfigDict(extra="forbid", strict=True)
    fields = {
        "/caption": {"image": image, **generation},
        "/ask": {"image": image, "prompt": (str, Field(min_length=1, max_length=prompt_chars)), **generation},
        "/match": {"image": image, "text": (str, Field(min_length=1, max_length=text_chars))},
        "/embed": {"image": image},
    }
    names = {"/caption": "CaptionRequest", "/ask": "AskRequest", "/match": "MatchRequest", "/embed": "EmbedRequest"}
    return {route: create_model(names[route], __config__=config, **f) for route, f in fields.items()}


def response_models() -> dict:
    from pydantic import BaseModel

    class CaptionResponse(BaseModel):
        caption: str

    class AskResponse(BaseModel):
        answer: str

    class MatchResponse(BaseModel):
        probability: float

    class EmbedResponse(BaseModel):
        features: list[list[float]]

    class ErrorResponse(BaseModel):
        error: str

    class OpenAIError(BaseModel):
        message: str
        type: str
        param: None
        code: None

    class OpenAIErrorResponse(BaseModel):  # (the /v1 routes' errors, in OpenAI's shape)
        error: OpenAIError

    return {"/caption": CaptionResponse, "/ask": AskResponse, "/match": MatchResponse, "/embed": EmbedResponse,
            "error": ErrorResponse, "openai_error": OpenAIErrorResponse}


def _validation_message(route: str, error, body) -> str:
    """A pydantic ValidationError as one line naming the field (never echoing the value: it may be megabytes);
    for a generation option the Python API's own message where it refuses the value too."""
    first = error.errors(include_url=False, include_input=False)[0]
    name = ".".join(str(p) for p in first["loc"]) or "the body"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join([*FIELDS[route], *(OPTIONS if route in ("/caption", "/ask") else ())]) or "none"
        return f"unknown option {name!r} for {route}; options are: {allowed}"
    if first["type"] == "missing":
        if name == "image":
            return ("the request has no 'image'; send {\"image\": \"<base64 of the file>\"} or a multipart upload "
                    "with the file in field 'image'")
        return f"{route} needs a '{name}' string"
    if first["type"] == "json_invalid" or not first["loc"]:
        return ("the body is not a JSON object (or is nested too deeply); send {\"image\": \"<base64>\", ...} with "
                "content-type application/json, or a multipart upload")
    if name in OPTIONS and isinstance(body, dict):
        from runtime import search

        try:  # (the Python API's message, naming the allowed range, where it refuses the value as well)
            search.config_from_options({name: body[name]}, 0, 0).validate()
        except Blip2EdgeError as e:
            return str(e)
        except Exception:  # noqa: BLE001 (a value of a type the check itself cannot compare: pydantic's message)
            pass
    return f"field {name!r}: {first['msg']}"


def parse(route: str, model, data: bytes | dict) -> tuple[Item, bytes]:
    """Check a request body (JSON bytes, or a multipart form's fields) against `model`: (the request, its image's
    encoded bytes, for `decode`). Raises a Blip2EdgeError naming the problem. Runs off the event loop."""
    from pydantic import ValidationError

    upload = None
    try:
        if isinstance(data, dict):  # multipart: the file's bytes aside, the rest validated as JSON would be
            upload, data = data.get("image"), dict(data)
            if isinstance(upload, bytes):
                data["image"] = "AA=="  # (a placeholder the pattern takes)
            body = model.model_validate(data)
        else:
            body = model.model_validate_json(data or b"null")
    except ValidationError as e:
        raise PromptError(_validation_message(route, e, data if isinstance(data, dict) else _loads(data))) from None
    raw = upload if isinstance(upload, bytes) else base64_image(body.image, "field 'image'")
    values = body.model_dump(exclude_none=True, exclude={"image"})
    text = values.pop(FIELDS[route][0]) if FIELDS[route] else None
    options = {k: values[k] for k in OPTIONS if k in values}
    return Item(route, None, text, options), raw


def decode(raw: bytes, max_image_pixels: int | None, preprocess) -> object:
    """An image's bytes as uint8 pixels at the model's input size (`preprocess`, an ImageProcessorConfig: a request
    waiting for its batch then holds 150 KB, not the decoded photo, and the pipeline's resize is a copy, exact).
    Runs in the replica's decoder process."""
    from runtime.image import decode_resized

    try:
        return decode_resized(raw, max_image_pixels, preprocess)
    except (ImageTooLargeError, ImageFormatError):
        raise
    except ImageInputError:
        raise ImageInputError("field 'image' is not an image PIL can read; send the bytes of a PNG or JPEG file "
                              "(base64 in JSON, or as a multipart file upload)") from None


class Decoder:
    """Images are decoded in a process of their own: Pillow holds the GIL while it decodes (the replica would stop
    answering, /health included, for the second a 36 Mpx PNG takes) and the decoded photo's memory is that
    process's, handed back when it is done. One image at a time; a decoder that died (killed for memory) is
    replaced, its request answered 500."""

    def __init__(self):
        self.pool = None

    async def __call__(self, raw: bytes, max_image_pixels: int | None, preprocess):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, decode, raw, max_image_pixels,
                                                                    preprocess)
        except BrokenProcessPool:
            self.pool = None
            raise


def _loads(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------- running
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
                except Exception as e:  # noqa: BLE001 (answered as 4xx or 500 by the caller)
                    out[n] = e
    return out


def engine_metrics(engine: GenerationEngine, registry) -> None:
    """Gauges read from the engine when /metrics is scraped."""
    from prometheus_client import Gauge

    for name, what, read in (
            ("blip2_running_rows", "decode rows running in the engine's batch", lambda: engine.running_rows),
            ("blip2_running_rows_peak", "the most decode rows the engine has run at once", lambda: engine.peak_rows),
            ("blip2_queue_depth", "requests waiting for rows in the engine", lambda: engine.queue_depth),
            ("blip2_image_cache_hits", "requests whose image's soft prompt was cached", lambda: engine.cache.hits),
            ("blip2_image_cache_misses", "requests whose image went through the vision graph",
             lambda: engine.cache.misses),
            ("blip2_image_cache_bytes", "bytes the image cache holds", lambda: engine.cache.bytes)):
        Gauge(name, what, registry=registry).set_function(read)


def misrouted(method: str, route: str) -> tuple[int, dict, dict] | None:
    """(404 or 405, JSON answer, headers) for a request the service has no handler for; None where it has."""
    if (method == "POST" and route in ROUTES) or (method in ("GET", "HEAD") and route in GETS):
        return None
    if route in ROUTES or route in GETS:
        allowed = "POST" if route in ROUTES else "GET"
        return 405, {"error": f"{route} takes {allowed}, not {method}"}, {"Allow": allowed}
    return 404, {"error": f"no such route here; POST to one of {', '.join(ROUTES)}, or GET {', '.join(GETS)}"}, {}


def status_of(value) -> int:
    """The HTTP status for a request's value: its result (200) or the exception it raised."""
    if isinstance(value, RequestError):
        return value.status
    if isinstance(value, ImageTooLargeError):
        return 413
    if isinstance(value, ImageFormatError):
        return 415
    if isinstance(value, Blip2EdgeError):
        return 400
    return 500 if isinstance(value, BaseException) else 200


def reply(route: str, value, folder: Path | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) for a request's value. A 4xx carries the error's message with the engine
    folder's location replaced by its name; a 500 carries nothing of the exception (the log has it)."""
    status = status_of(value)
    if status == 500:
        return 500, {"error": "internal error while answering this request; the service's log has the details"}
    if status != 200:
        return status, {"error": public(str(value), folder)}
    return 200, value if route == CHAT else {ROUTES[route]: value}


def public(message: str, folder: Path | None) -> str:
    """`message` without the server's paths: the engine folder's parents become OUT (the rebuild hints' --out)."""
    if folder is None:
        return message
    folder = Path(folder).resolve()
    for path, name in ((folder, folder.name), (folder.parent.parent, "OUT"), (folder.parent, folder.parent.name)):
        if len(path.parts) > 1:
            message = message.replace(str(path), name)
    return message


def _host_name(value: str) -> str:
    """The name in a Host header or an Origin's authority (port and IPv6 brackets dropped), lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def check_origin(method: str, headers, limits: ServiceLimits) -> None:
    """Host (DNS rebinding: 421) and, on a POST, Origin (a browser page of another site: 403), on every route before
    anything else. Raises RequestError."""
    host = _host_name(headers.get("host", ""))
    if limits.allowed_hosts is not None and host not in limits.allowed_hosts:
        raise RequestError(421, f"this service answers requests for {', '.join(limits.allowed_hosts)}, not for the "
                                f"host this request names; start it with --allowed-hosts to add a name")
    origin = headers.get("origin")
    if origin is not None and method not in ("GET", "HEAD", "OPTIONS"):
        netloc = urllib.parse.urlsplit(origin).netloc
        if not netloc or (_host_name(netloc) != host and _host_name(netloc) not in (limits.allowed_hosts or ())):
            raise RequestError(403, "requests from web pages of another origin are refused: this service takes "
                                    "requests from programs (no Origin header) or pages it serves itself")


def check_body_headers(headers, limits: ServiceLimits) -> None:
    """The body's declared length (413) and type (415), before it is read. Raises RequestError."""
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        raise RequestError(413, f"the body is over {limits.max_body_mb:g} MB (--max-body-mb); send a smaller image")
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/json", "multipart/form-data", ""):
        raise RequestError(415, f"content-type {kind!r} is not taken; send application/json or multipart/form-data")


SMALL_BODY = 2**20  # bodies below this pass beside the ByteBudget (a photo of a few hundred pixels a side)
# A large body waits this long for the ByteBudget, then gets 503 with Retry-After: bodies that wait are buffered in the
# replica by Ray meanwhile (8 bodies of 19 MB waiting grew it by up to 340 MiB; answered at once, 60-140 MiB).
BUDGET_WAIT_S = 0.05


class ByteBudget:
    """The bytes of request bodies a replica reads and parses at once: a request waits for its body's declared
    length (the largest allowed where none is declared) before reading it, so that many large bodies at once do not
    add up in memory (each costs about 4.5x its size while it is parsed: the body, Ray's copy of it, the JSON
    string, the decoded bytes); one that cannot have its bytes soon is answered 503; small ones pass beside them."""

    def __init__(self, total: int):
        self.total, self.free, self.changed = total, total, None

    @contextlib.asynccontextmanager
    async def hold(self, size: int, timeout: float, request=None, limits: "ServiceLimits | None" = None):
        """Within the block, `size` bytes of the budget are this request's; none free within `timeout`: 503, after
        reading `request`'s body and dropping it chunk by chunk (so its client, which sends the body before it
        reads an answer, gets the 503 rather than a closed connection)."""
        size = min(size, self.total)
        self.changed = self.changed or asyncio.Condition()
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.free >= size), timeout)
            except asyncio.TimeoutError:
                busy = True
            else:
                busy = False
                self.free -= size
        if busy:
            if request is not None:
                await discard_body(request, limits)
            raise RequestError(503, "the service is busy reading other large requests; retry in a second",
                               {"Retry-After": "1"})
        try:
            yield
        finally:
            async with self.changed:
                self.free += size
                self.changed.notify_all()


async def discard_body(request, limits: ServiceLimits) -> None:
    """Read a body without keeping it (at most --max-body-mb, within --body-timeout-s; a failure is ignored)."""
    async def drain():
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limits.max_body_bytes:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(drain(), limits.body_timeout_s)


async def read_body(request, limits: ServiceLimits) -> bytearray:
    """The body, at most limits.max_body_bytes (413 past it, before the rest is read) within body_timeout_s (408),
    copied chunk by chunk into one buffer (a list of chunks left the heap full of freed holes)."""
    declared = request.headers.get("content-length")
    body = bytearray(int(declared)) if declared else bytearray()
    size = 0

    async def receive():
        nonlocal size
        async for part in request.stream():
            if size + len(part) > limits.max_body_bytes or (declared and size + len(part) > len(body)):
                raise RequestError(413, f"the body is over {limits.max_body_mb:g} MB (--max-body-mb) or over its "
                                        f"Content-Length; send a smaller image")
            if declared:
                body[size:size + len(part)] = part
            else:
                body.extend(part)
            size += len(part)

    try:
        await asyncio.wait_for(receive(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body was not received within {limits.body_timeout_s:g} s "
                                f"(--body-timeout-s); send it at once") from None
    if declared and size != len(body):
        raise RequestError(400, f"the body ended after {size} of the {len(body)} bytes its Content-Length declares")
    return body


async def read_form(request, data: bytes, limits: ServiceLimits) -> dict:
    """A multipart body (already read) as {field: value}: the file in 'image' as bytes, other fields as JSON
    values where they parse. Starlette's limits (fields, files, part size) answer 400."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=len(OPTIONS) + 4,
                                                         max_part_size=2**20)
    except (MultiPartException, HTTPException) as e:  # (Starlette raises the second for the first in an app)
        reason = getattr(e, "detail", None) or getattr(e, "message", None) or "unreadable"
        raise RequestError(400, f"the multipart body is not one this service takes ({reason}); send the file in "
                                f"field 'image' (at most 1 MB per other field, {len(OPTIONS) + 3} fields)") from None
    body = {}
    for key, value in form.items():
        if hasattr(value, "read"):
            body[key] = await value.read()
        elif key in ("prompt", "text", "decoder"):  # (strings: "0" is a prompt, not a number)
            body[key] = value
        else:
            try:
                body[key] = json.loads(value)
            except (ValueError, RecursionError):
                body[key] = value
    return body


# ---------------------------------------------------------------------------------------------- the application
BATCHING = ("continuous", "requests")


def build_app(engines: str, max_batch_size: int | None = None, batch_wait_ms: float = 10.0, replicas: int = 1,
              threads: int | None = None, backend: str = "auto", gpus: float | None = None,
              limits: ServiceLimits | None = None, batching: str = "continuous", providers: list | None = None):
    """The Ray Serve application (bind()-ed deployment) for `engines`; each replica asks Ray for one CPU and
    `gpus` GPUs (default: 1 for a TensorRT engine folder, else 0; `runtime.actors`). `batching`: "continuous"
    (generation on runtime.engine, streaming and /v1 included) or "requests" (whole requests batched by
    serve.batch, as before the engine: kept for comparison, bench/bench_serve.py)."""
    return _application(engines, max_batch_size, batch_wait_ms, replicas, threads, backend, gpus, limits,
                        batching, providers)[0]


def _application(engines: str, max_batch_size: int | None = None, batch_wait_ms: float = 10.0, replicas: int = 1,
                 threads: int | None = None, backend: str = "auto", gpus: float | None = None,
                 limits: ServiceLimits | None = None, batching: str = "continuous",
                 providers: list | None = None) -> tuple:
    """build_app's application, and the GPUs each replica asks for (start checks the cluster has them)."""
    from ray import serve

    from runtime.manifest import load_manifest

    limits = limits or ServiceLimits()
    limits.check()
    if batching not in BATCHING:
        raise ServeOptionError(f"--batching {batching!r}: give one of {', '.join(BATCHING)}")
    manifest = load_manifest(engines)
    if providers:  # (a provider this onnxruntime lacks is named here, before Ray starts, not in a replica's log)
        try:
            check_providers(providers)
        except BackendError as e:
            raise ServeOptionError(f"--providers: {e}") from None
    limit, per_replica = manifest.limits.max_batch, gpus_per_actor(manifest, gpus, providers)
    batch = max_batch_size or limit
    if not 1 <= batch <= limit:
        raise ServeOptionError(f"--max-batch-size {batch} is outside 1..{limit}, the engine folder's max batch; "
                               f"rebuild with `python -m export.build --max-batch {batch}` for larger batches")
    if not (isinstance(replicas, int) and replicas >= 1):
        raise ServeOptionError(f"--replicas {replicas!r}: give 1 or more copies of the pipeline")
    if not batch_wait_ms >= 0:
        raise ServeOptionError(f"--batch-wait-ms {batch_wait_ms!r}: give 0 or more milliseconds")
    queued = 4 * batch if limits.max_queued is None else limits.max_queued
    capacity = batch + queued  # requests a replica holds at once (parsing, waiting, running); past it, 503
    folder = str(Path(engines).resolve())

    # (two malloc arenas, not eight per core: the threads that receive and parse bodies otherwise each keep the
    # freed memory of their own arena)
    actor = {"num_cpus": 1, "num_gpus": per_replica, "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}}

    @serve.deployment(num_replicas=replicas, ray_actor_options=actor,
                      # Ray hands the replica far more requests than it holds, so that the replica itself answers
                      # 503 past its capacity at once (a request costs its connection until it is admitted, its body
                      # is read after) and /health never waits in Ray's queue; that queue is bounded too (Ray: 503)
                      max_ongoing_requests=capacity + 256, max_queued_requests=capacity,
                      graceful_shutdown_timeout_s=limits.request_timeout_s)
    @serve.ingress()
    class Blip2Service:
        def __init__(self):
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

            from runtime import Blip2Pipeline
            from runtime.memory import map_large_allocations

            self.pipe = Blip2Pipeline.from_dir(folder, backend=backend, threads=threads, providers=providers,
                                               max_image_pixels=limits.max_image_pixels)
            self.models = request_models(self.pipe.manifest, limits)
            # Bodies are parsed off the event loop (which keeps answering /health) and images decoded in a process
            # of their own, one at a time, within a budget of two bodies' bytes; large freed buffers go back to
            # the system at once. Measured peak growth of the replica: docs/scale.md.
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="blip2-parse")
            self.decoder = Decoder()
            self.budget = ByteBudget(limits.max_body_bytes)
            map_large_allocations()
            self.held = 0
            self.registry = CollectorRegistry()
            self.requests = Counter("blip2_requests", "requests answered", ["route", "status"],
                                    registry=self.registry)
            self.latency = Histogram("blip2_request_seconds", "time to answer a request", ["route"],
                                     registry=self.registry)
            self.batches = Histogram("blip2_batch_size", "requests per pipeline batch", buckets=(1, 2, 4, 8, 16, 32),
                                     registry=self.registry)
            self.held_gauge = Gauge("blip2_requests_held", "requests this replica holds (parsing, waiting, running)",
                                    registry=self.registry)
            self.engine = None
            if self.pipe.llm is not None and batching == "continuous":  # (generation on the engine, on a thread)
                self.engine = GenerationEngine(self.pipe, batch, int(limits.image_cache_mb * 2**20))
                self.stopping = threading.Event()
                threading.Thread(target=self.engine.serve_forever, args=(self.stopping,), daemon=True,
                                 name="blip2-engine").start()
                engine_metrics(self.engine, self.registry)
                self.first_token = Histogram("blip2_time_to_first_token_seconds", "from a request's arrival at the "
                                             "engine to its first token", registry=self.registry)
                self.tokens = Counter("blip2_generated_tokens", "tokens generated (rate: tokens/s)",
                                      registry=self.registry)
            self.served = f"{Path(folder).resolve().parent.name}/{Path(folder).resolve().name}"
            self.models[CHAT] = chat_model(self.pipe.manifest, limits.max_body_bytes, batch)

        def __serve_build_asgi_app__(self):
            return _fastapi_app(self, limits, capacity)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=batch_wait_ms / 1000)
        async def answer(self, items: list[Item]) -> list:
            self.batches.observe(len(items))
            return await asyncio.get_running_loop().run_in_executor(None, answer_batch, self.pipe, items)

        def __del__(self):
            if getattr(self, "engine", None) is not None:
                self.engine.stop(self.stopping)

        async def generate(self, item: Item, options: dict | None = None, on_tokens=None):
            """One image's generation on the engine: its finished Handle. `on_tokens(handle)` (on the event loop):
            each step that added tokens. Cancelled (a timeout, a client gone): its rows leave the batch."""
            loop = asyncio.get_running_loop()
            done = loop.create_future()

            def update(h):  # (on the engine's thread)
                if h.done:
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(h))
                elif on_tokens is not None:
                    loop.call_soon_threadsafe(on_tokens, h)

            options = {k: v for k, v in (item.options if options is None else options).items() if k != "decoder"}
            handle = await loop.run_in_executor(self.pool, lambda: self.engine.submit(
                item.image, item.text, on_update=update, **options))
            try:
                h = await done
            except asyncio.CancelledError:
                handle.cancel()
                raise
            if h.error is not None:
                raise h.error
            if h.first_token_at is not None:
                self.first_token.observe(h.first_token_at - h.submitted)
            self.tokens.inc(len(h.tokens))
            return h

        def on_engine(self, item: Item) -> bool:
            return self.engine is not None and item.route in ("/caption", "/ask", CHAT) \
                and item.options.get("decoder", "llm") == "llm"

        async def run(self, item: Item, call):
            """The answer to a parsed request: a value for reply(), or (chat) a completion or an event stream."""
            if item.route == CHAT:
                if self.engine is None:
                    raise RequestError(404, "this service has no continuous-batching engine to chat with (a "
                                            "stage-1 folder without an LLM, or --batching requests)")
                if call.stream:
                    return self.stream(item, call)
                handles = await asyncio.gather(*(self.generate(item, o) for o in call.options))
                return completion(call, handles, self.pipe.manifest.llm.eos_token_id)
            if self.on_engine(item):
                return (await self.generate(item)).text
            return await asyncio.shield(self.answer(item))

        async def stream(self, item: Item, call):
            """Server-sent events: a chunk per new piece of text of each choice, then each choice's finish reason,
            usage if asked, [DONE]. Bounded by --request-timeout-s as a whole."""
            queue, texts = asyncio.Queue(), [TextStream(self.pipe.llm.tokenizer) for _ in call.options]
            tasks = [asyncio.ensure_future(self.generate(item, o, on_tokens=lambda h, i=i: queue.put_nowait((i, h))))
                     for i, o in enumerate(call.options)]
            for i, t in enumerate(tasks):
                t.add_done_callback(lambda t, i=i: queue.put_nowait((i, t)))
            deadline = time.monotonic() + limits.request_timeout_s
            eos, finished = self.pipe.manifest.llm.eos_token_id, []
            started = set()  # choices whose first chunk (the role, as OpenAI sends it) went: at their first token
            try:
                while len(finished) < len(tasks):
                    i, what = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                    if i not in started:
                        started.add(i)
                        yield chunk(call, i, {"role": "assistant", "content": ""})
                    if isinstance(what, asyncio.Future):
                        h = what.result()  # (raises the generation's error: ends the stream below)
                        piece = texts[i].finish(h.tokens)
                        if piece:
                            yield chunk(call, i, {"content": piece})
                        yield chunk(call, i, {}, finish_reason(h.tokens, eos))
                        finished.append(h)
                    else:
                        piece = texts[i].push(what.tokens)
                        if piece:
                            yield chunk(call, i, {"content": piece})
                if call.include_usage:
                    yield chunk(call, usage_of=finished)
            except Exception as e:  # noqa: BLE001 (the status is sent: the error goes in the stream)
                e = RequestError(504, f"no answer within {limits.request_timeout_s:g} s (--request-timeout-s)") \
                    if isinstance(e, asyncio.TimeoutError) else e
                if status_of(e) == 500:
                    log.error("%s failed", CHAT, exc_info=e)
                yield f"data: {json.dumps(error_body(status_of(e), reply(CHAT, e, Path(folder))[1]['error']))}\n\n"
            finally:
                for t in tasks:
                    t.cancel()
            yield "data: [DONE]\n\n"

        def release(self) -> None:
            self.held -= 1
            self.held_gauge.set(self.held)

        async def holding(self, events):
            try:
                async for event in events:
                    yield event
            finally:
                self.release()

        async def handle(self, route: str, request) -> tuple[int, dict, dict]:
            """(status, JSON answer or an event stream, headers) for a POST to `route`."""
            if self.held >= capacity:
                return 503, {"error": f"the service is busy ({capacity} requests held by this replica); retry in "
                                      f"a second"}, {"Retry-After": "1"}
            self.held += 1
            self.held_gauge.set(self.held)
            try:
                check_body_headers(request.headers, limits)
                declared = request.headers.get("content-length")
                size = int(declared) if declared else limits.max_body_bytes
                async with self.budget.hold(size if size >= SMALL_BODY else 0, BUDGET_WAIT_S, request, limits):
                    data = await read_body(request, limits)
                    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                        data = await read_form(request, data, limits)
                    loop = asyncio.get_running_loop()
                    if route == CHAT:
                        call, raw = await loop.run_in_executor(self.pool, parse_chat, self.models[route], data,
                                                               self.served)
                        item = Item(route, None, call.prompt)
                    else:
                        (item, raw), call = await loop.run_in_executor(self.pool, parse, route, self.models[route],
                                                                       data), None
                    del data
                    item.image = await self.decoder(raw, limits.max_image_pixels, self.pipe.manifest.image)
                    del raw
                value = await asyncio.wait_for(self.run(item, call), limits.request_timeout_s)
            except asyncio.TimeoutError:
                value = RequestError(504, f"no answer within {limits.request_timeout_s:g} s (--request-timeout-s); "
                                          f"the service is overloaded or the request asks for too much")
            except Exception as e:  # noqa: BLE001 (answered below: 4xx or 500, and the replica goes on)
                value = e
            finally:
                if int(request.headers.get("content-length") or SMALL_BODY) >= SMALL_BODY:
                    trim()  # (a large body's freed pages go back to the system)
            if inspect.isasyncgen(value):  # a stream holds its place until its last event
                value = self.holding(value)
            else:
                self.release()
            if status_of(value) == 500:
                log.error("%s failed", route, exc_info=value)
            status, payload = reply(route, value, Path(folder))
            return status, payload, getattr(value, "headers", {})

    return Blip2Service.bind(), per_replica


def _fastapi_app(service, limits: ServiceLimits, capacity: int):
    """The FastAPI application of one replica: typed routes (their request models in /openapi.json), the header
    checks, and every error as {"error": message}."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from prometheus_client import generate_latest
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse

    responses = response_models()
    error = {"model": responses["error"]}
    documented = {400: {**error, "description": "a wrong type, missing field or value out of range"},
                  403: error, 408: error, 413: error, 415: error, 421: error,
                  503: {**error, "description": "busy: retry after Retry-After seconds"}, 504: error}
    app = FastAPI(title="blip2-edge", description=__doc__.split("\n\n", 1)[1], version="1",
                  docs_url="/docs", redoc_url=None)

    def respond(route: str, status: int, payload: dict, headers: dict | None = None, path: str = "") -> JSONResponse:
        service.requests.labels(route if route in ROUTES or route in GETS else "other", str(status)).inc()
        if (path or route).startswith("/v1/") and status != 200 and isinstance(payload.get("error"), str):
            payload = error_body(status, payload["error"])  # (OpenAI's shape, which its clients read)
        return JSONResponse(payload, status_code=status, headers=headers or None)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # Host and Origin, on every route (GETs included)
        try:
            check_origin(request.method, request.headers, limits)
        except RequestError as e:
            return respond("other", e.status, {"error": str(e)}, e.headers, request.url.path)
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 (never a stack or an exception's text in a response)
            log.exception("unhandled error on %s", request.url.path)
            return respond("other", 500, reply("/caption", RuntimeError())[1], path=request.url.path)

    @app.exception_handler(HTTPException)
    async def not_here(request: Request, e: HTTPException):
        route = request.url.path.rstrip("/") or "/"
        wrong = misrouted(request.method, route) or (e.status_code, {"error": str(e.detail)}, {})
        return respond("other", wrong[0], wrong[1], wrong[2], request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return respond("other", 400, {"error": "the request does not match the route's contract (see /docs)"},
                       path=request.url.path)

    def endpoint(route: str):
        async def post(request: Request):
            started = time.perf_counter()
            status, payload, headers = await service.handle(route, request)
            service.latency.labels(route).observe(time.perf_counter() - started)
            if route == CHAT and inspect.isasyncgen(payload):
                service.requests.labels(route, "200").inc()
                return StreamingResponse(payload, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return respond(route, status, payload, headers)
        return post

    components = {}
    schema = service.models[CHAT].model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    openai_error = {"model": responses["openai_error"]}
    app.add_api_route(CHAT, endpoint(CHAT), methods=["POST"],
                      responses={**{code: {**openai_error, **{k: v for k, v in doc.items() if k == "description"}}
                                    for code, doc in documented.items()},
                                 404: {**openai_error, "description": "another model's name"}},
                      summary="OpenAI-compatible chat completion: one user message with an image (data URL) and an "
                              "optional prompt; `stream` for server-sent events",
                      openapi_extra={"requestBody": {"required": True,
                                                     "content": {"application/json": {"schema": schema}}}})

    @app.get(MODELS, summary="OpenAI-compatible: the model this service serves")
    async def models():
        return models_list(service.served, 0)

    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    for route, model in service.models.items():
        if route == CHAT:
            continue
        schema = model.model_json_schema()
        upload = {"type": "object", "required": ["image"],
                  "properties": {"image": {"type": "string", "format": "binary"},
                                 **{k: v for k, v in schema["properties"].items() if k != "image"}}}
        if "required" in schema:
            upload["required"] = sorted(set(schema["required"]))
        app.add_api_route(
            route, endpoint(route), methods=["POST"], response_model=responses[route], responses=documented,
            summary={"/caption": "caption an image", "/ask": "answer a prompt about an image",
                     "/match": "ITM: the probability that an image matches a text",
                     "/embed": "the image's ITC features"}[route],
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": schema}, "multipart/form-data": {"schema": upload}}}})

    @app.get("/health", summary="200 once the replica has loaded its engine folder")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus text: this replica's counters", response_class=Response)
    async def metrics():
        return Response(generate_latest(service.registry), media_type="text/plain; version=0.0.4")

    return app


def app(args: dict):
    """The application for `serve run` and Serve config files, options as strings:
    `serve run runtime.serve:app engines=engines/demo/onnx max_batch_size=8 batch_wait_ms=10 replicas=2`."""
    kinds = {"engines": str, "max_batch_size": int, "batch_wait_ms": float, "replicas": int, "threads": int,
             "backend": str, "gpus": float, "max_body_mb": float, "max_image_pixels": int, "max_queued": int,
             "request_timeout_s": float, "body_timeout_s": float, "allowed_hosts": str, "image_cache_mb": float,
             "batching": str, "providers": str}
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
    service = {k: options.pop(k) for k in list(options) if k in ServiceLimits.__dataclass_fields__}
    if "providers" in options:
        options["providers"] = provider_names(options["providers"]) or None
    if "allowed_hosts" in service:
        service["allowed_hosts"] = tuple(h.strip().lower() for h in service["allowed_hosts"].split(",") if h.strip())
    return build_app(**options, limits=ServiceLimits(**service))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(engines: str, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
          limits: ServiceLimits | None = None, **app_options) -> str:
    """Start Ray, Ray Serve's HTTP proxy on host:port and the application; returns the URL it serves on.

    Ray: a local instance of its own, unless `ray_address` (or RAY_ADDRESS) names one to attach to. With a loopback
    `host`, that instance's own processes bind loopback too. Without `limits.allowed_hosts`, a loopback `host`
    answers only requests naming a loopback host (DNS rebinding), any other host answers any."""
    if not (isinstance(port, int) and 1 <= port <= 65535):
        raise ServeOptionError(f"--port {port!r} is not a TCP port; give one in 1..65535 (default 8000)")
    limits = limits or ServiceLimits()
    if limits.allowed_hosts is None and is_loopback(host):
        limits = ServiceLimits(**{**limits.__dict__, "allowed_hosts": LOOPBACK_NAMES})

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    # Ray Serve marks its HTTP proxy dead when it is not ready within 5 s, three times: on a small machine that
    # is busy (2 cores, a build beside it) it is not, and the start fails. (Read by Ray's processes, which
    # inherit this environment when ray.init starts them.)
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "60")
    import ray
    from ray import serve

    application, per_replica = _application(engines, limits=limits, **app_options)  # (checked before Ray)
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if not ray.is_initialized():  # (else the caller's Ray, which may be a cluster's: not checked)
        extra = {"_node_ip_address": "127.0.0.1"} if is_loopback(host) and address == "local" else {}
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False, **extra)
        check_cluster_gpus(per_replica, app_options.get("replicas", 1), "replica", address)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # (its INFO lines: started, connecting, ready)
    try:
        # (the proxy's own timeout backs the replica's 504, for requests that never reach a replica)
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": limits.request_timeout_s + 30})
        serve.run(application, name=APP_NAME, route_prefix="/")
    except Exception as e:  # noqa: BLE001 (Ray raises its task error wrapping the proxy's RuntimeError)
        if "Failed to bind to address" in str(e):
            raise ServeOptionError(f"could not listen on {host}:{port}: the port is in use (another server, or a "
                                   f"service still running); choose another with --port") from None
        raise
    try:  # (on a Ray that already ran Serve, its proxy keeps the host and port it was started with)
        shown = serve.context._get_global_client().http_config
        host, port = shown.host or host, shown.port or port
    except Exception:  # noqa: BLE001 (a private API of Ray Serve's: where it differs, what was asked for)
        pass
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def stop() -> None:
    """Delete the application (its replicas finish the requests they hold first) and leave Ray, ignoring a second
    Ctrl-C meanwhile (a terminal's Ctrl-C reaches Ray's processes too, and its own shutdown would print a traceback
    when interrupted). A Ray instance that `start` started ends with this process; on a cluster that was already
    running, Ray Serve and any other application stay. Safe at any point of `start`, Ray still starting included.
    (`serve.shutdown()` would stop Serve for the whole cluster, and here it printed a raylet line about its
    controller's interrupted shutdown task.)"""
    import signal

    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)
    except RayServeException:  # Ctrl-C before Serve had started: there is nothing to delete
        pass
    finally:
        ray.shutdown()
