"""The OpenAI-compatible routes of `runtime serve`: their request model, and the answers in OpenAI's shapes.

    POST /v1/chat/completions   one user message: an image part and, optionally, text parts (the prompt; no text:
                                a caption); max_tokens / max_completion_tokens, temperature, top_p, seed, n, stream
    GET  /v1/models             the one model this service serves

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                    {"type": "text", "text": "Question: what is in the picture? Answer:"}]}])

BLIP-2 answers one image and one prompt, not a conversation: a request holds exactly one user message (no system
or assistant turns) with one image, sent as a data URL; the service fetches nothing, so an http(s) URL is refused.
Decoding: greedy unless `temperature` > 0 or `top_p` < 1 asks for sampling (a captioner's answer is then the same
every time, where OpenAI's own default samples); `n` choices run as n requests of the engine (with `seed`, choice i
samples with seed + i). Errors come as OpenAI's {"error": {"message", "type", "param", "code"}}, which the
official client raises as its exceptions (BadRequestError for a 400, ...).
"""
import json
import time
import uuid
from dataclasses import dataclass, field

from runtime.errors import ImageInputError, PromptError, RequestError
from runtime.image import base64_image

CHAT, MODELS = "/v1/chat/completions", "/v1/models"
ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
               408: "timeout_error", 413: "invalid_request_error", 415: "invalid_request_error",
               421: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error", 500: "server_error"}


@dataclass
class ChatCall:
    """A checked chat request: the prompt (None: a caption), per-choice generation options, stream settings."""
    prompt: str | None
    options: list[dict]  # one per choice
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def chat_model(manifest, max_body_bytes: int, max_n: int):
    """The pydantic model of a chat request, bounded by the engine folder's limits."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field

    from runtime.text import MAX_CHARS_PER_TOKEN

    lim = manifest.limits
    new_tokens, prompt_tokens = lim.max_new_tokens or 1, lim.max_prompt_tokens or 1  # (a folder without an LLM: 404)
    config = ConfigDict(extra="forbid", strict=True)

    class ImageUrl(BaseModel):
        model_config = config
        url: str = Field(min_length=1, max_length=4 * (max_body_bytes // 3) + 200)
        detail: Optional[Literal["auto", "low", "high"]] = None

    class ImagePart(BaseModel):
        model_config = config
        type: Literal["image_url"]
        image_url: ImageUrl

    class TextPart(BaseModel):
        model_config = config
        type: Literal["text"]
        text: str = Field(max_length=prompt_tokens * MAX_CHARS_PER_TOKEN)

    class Message(BaseModel):
        model_config = config
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[Union[ImagePart, TextPart]]] = Field(max_length=16)
        name: Optional[str] = Field(None, max_length=64)

    class StreamOptions(BaseModel):
        model_config = config
        include_usage: Optional[bool] = None

    class ChatCompletionRequest(BaseModel):
        model_config = config
        model: str = Field(min_length=1, max_length=256)
        messages: list[Message] = Field(min_length=1, max_length=16)
        max_tokens: Optional[int] = Field(None, ge=1, le=new_tokens)
        max_completion_tokens: Optional[int] = Field(None, ge=1, le=new_tokens)
        temperature: Optional[float] = Field(None, ge=0, le=100, allow_inf_nan=False)
        top_p: Optional[float] = Field(None, ge=1e-6, le=1)
        seed: Optional[int] = Field(None, ge=0, le=2**63 - 1 - max_n)
        n: Optional[int] = Field(None, ge=1, le=max_n)
        stream: Optional[bool] = None
        stream_options: Optional[StreamOptions] = None
        user: Optional[str] = Field(None, max_length=256)

    return ChatCompletionRequest


def parse_chat(model, data: bytes, served: str) -> tuple[ChatCall, bytes]:
    """Check a chat request body: (the call, the image's encoded bytes). Raises PromptError / ImageInputError
    naming the problem (answered 400), or RequestError 404 for another model's name."""
    from pydantic import ValidationError

    try:
        body = model.model_validate_json(data or b"null")
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        if first["type"] == "json_invalid" or not first["loc"]:
            raise PromptError("the body is not a JSON object; send a chat completion request (see /docs)") from None
        raise PromptError(f"field {where!r}: {first['msg']}") from None
    if body.model != served:
        raise RequestError(404, f"model {body.model!r} is not served here; this service serves {served!r} "
                                f"(GET /v1/models)")
    others = [m.role for m in body.messages if m.role != "user"]
    users = [m for m in body.messages if m.role == "user"]
    if others or len(users) != 1:
        raise PromptError("BLIP-2 answers one user message (an image and an optional text), not a conversation: "
                          "send exactly one message with role 'user', without system or assistant turns")
    content = users[0].content
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else [p.model_dump() for p in content]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    if len(images) != 1:
        raise PromptError(f"the message has {len(images)} images; BLIP-2 answers about exactly one: send one "
                          f"content part {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/png;"
                          f"base64,...\"}}}}")
    text = " ".join(p["text"].strip() for p in parts if p["type"] == "text" and p["text"].strip()) or None
    options = {}
    if body.max_tokens is not None or body.max_completion_tokens is not None:
        options["max_new_tokens"] = body.max_completion_tokens or body.max_tokens
    if body.temperature or (body.top_p is not None and body.top_p < 1):
        options["do_sample"] = True
        if body.temperature:
            options["temperature"] = body.temperature
        if body.top_p is not None:
            options["top_p"] = body.top_p
    n = body.n or 1
    per_choice = [{**options, **({"seed": body.seed + i} if body.seed is not None else {})} for i in range(n)]
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatCall(text, per_choice, bool(body.stream), usage, served), image_bytes(images[0])


def image_bytes(url: str) -> bytes:
    """The bytes of a data URL's image; anything else is refused (the service fetches nothing)."""
    head = url[:100].lower()
    if head.startswith(("http://", "https://")):
        raise ImageInputError("image_url is a web address; this service fetches nothing: send the image itself as "
                              "a data URL, data:image/png;base64,<the file's bytes in base64>")
    if not head.startswith("data:") or ";base64," not in head:
        raise ImageInputError("image_url must be a data URL, data:image/png;base64,<the file's bytes in base64>")
    return base64_image(url.split(",", 1)[1], "image_url's data")


def finish_reason(tokens: list[int], eos_token_id: int) -> str:
    return "stop" if tokens and tokens[-1] == eos_token_id else "length"


def completion(call: ChatCall, handles: list, eos_token_id: int) -> dict:
    """The chat.completion object for finished engine handles (one per choice)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": h.text},
                "finish_reason": finish_reason(h.tokens, eos_token_id), "logprobs": None}
               for i, h in enumerate(handles)]
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.model,
            "choices": choices, "usage": usage(handles)}


def usage(handles: list) -> dict:
    prompt, done = handles[0].prompt_tokens, sum(len(h.tokens) for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def chunk(call: ChatCall, index: int | None = None, delta: dict | None = None, finish: str | None = None,
          usage_of: list | None = None) -> str:
    """One server-sent event of a streamed completion (a chat.completion.chunk)."""
    body = {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model,
            "choices": [] if index is None else [{"index": index, "delta": delta or {}, "finish_reason": finish,
                                                  "logprobs": None}]}
    if usage_of is not None:
        body["usage"] = usage(usage_of)
    return f"data: {json.dumps(body)}\n\n"


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": None,
                      "code": None}}


def models_list(served: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                        "owned_by": "blip2-edge"}]}
