"""`python -m runtime serve` (runtime/serve.py): the Ray Serve application on a local Ray instance, answering
on 127.0.0.1; answers equal the Python API's, requests that arrive together are batched and answer what they
answer alone, bad requests get a 4xx with the Python API's message before any expensive work, hostile ones
(decompression bombs, huge bodies, deep JSON, foreign origins and hosts) a 4xx too, overload a 503, internal
failures a 500 that says nothing of the server."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("multipart")

from export.parity import probe_images  # noqa: E402
from runtime.errors import PromptError  # noqa: E402
from runtime.serve import Item, ServeOptionError, answer_batch, app, misrouted, reply  # noqa: E402


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(make_engine):
    import ray
    from ray import serve

    from runtime import Blip2Pipeline
    from runtime.serve import start

    _, engine = make_engine("stage2text")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    start(str(engine), port=port, batch_wait_ms=200)  # a long wait: concurrent requests surely batch
    yield f"http://127.0.0.1:{port}", Blip2Pipeline.from_dir(engine)
    serve.shutdown()
    ray.shutdown()


def _post(url, body=None, data=None, headers=None):
    data = json.dumps(body).encode() if body is not None else data
    request = urllib.request.Request(url, data=data, headers=headers or {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _status_and_retry_after(url: str, data: bytes) -> tuple[int, str | None]:
    """POST a JSON body: (the status, the Retry-After header of an error)."""
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Retry-After")


def _b64(image) -> str:
    return base64.b64encode(_png(image)).decode()


GEN = {"max_new_tokens": 6, "min_new_tokens": 3}


def test_answers_equal_the_python_api_batched_or_alone(service):
    url, pipe = service
    images = probe_images(32, count=6, seed=9)
    prompt = "Question: what is it? Answer:"

    def caption(i):
        return _post(f"{url}/caption", {"image": _b64(images[i]), **GEN})

    with ThreadPoolExecutor(6) as pool:  # arrive together: they share the engine's decode steps
        batched = list(pool.map(caption, range(6)))
    for i, (status, body) in enumerate(batched):
        assert status == 200 and body["caption"] == pipe.caption(images[i], **GEN)[0]
    status, body = _post(f"{url}/ask", {"image": _b64(images[0]), "prompt": prompt, **GEN})
    assert status == 200 and body["answer"] == pipe.generate(images[0], prompt=prompt, **GEN)[0]
    status, body = _post(f"{url}/match", {"image": _b64(images[1]), "text": "a red circle"})
    assert status == 200 and abs(body["probability"] - float(pipe.itm(images[1], "a red circle")[0])) < 1e-6
    status, body = _post(f"{url}/embed", {"image": _b64(images[2])})
    np.testing.assert_allclose(np.array(body["features"]), pipe.embed_images(images[2])[0], atol=1e-6)
    # a multipart upload: the file in field `image`, options as form fields
    boundary = "blip2edgeboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + _png(images[3]) + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in GEN.items()]
    status, body = _post(f"{url}/caption", data=b"".join(parts) + f"--{boundary}--\r\n".encode(),
                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and body["caption"] == pipe.caption(images[3], **GEN)[0]
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("blip2_")}
    assert values["blip2_running_rows_peak"] > 1  # (precondition: some requests were batched)
    assert json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read()) == {"status": "ok"}


def _data_url(image) -> str:
    return "data:image/png;base64," + _b64(image)


def _chat(client, model, image, text=None, **options):
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}]
    content += [{"type": "text", "text": text}] if text is not None else []
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **options)


def test_the_openai_client_gets_what_the_python_api_generates(service):
    """The official client: a caption (no text), a prompt, a streamed answer, n sampled choices with a seed, usage
    counts; each text equal to Blip2Pipeline.generate's for the same request."""
    openai = pytest.importorskip("openai")
    url, pipe = service
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    [model] = [m.id for m in client.models.list().data]
    image = probe_images(32, count=1, seed=12)[0]
    prompt = "Question: what is it? Answer:"
    reply = _chat(client, model, image, max_tokens=6)
    assert reply.choices[0].message.content == pipe.caption(image, max_new_tokens=6)[0]
    ids = pipe.generate_ids(image, prompt=prompt, max_new_tokens=6)[0]
    reply = _chat(client, model, image, prompt, max_completion_tokens=6)
    assert reply.choices[0].message.content == pipe.generate(image, prompt=prompt, max_new_tokens=6)[0]
    assert reply.usage.completion_tokens == len(ids)
    assert reply.usage.prompt_tokens == len(pipe.llm.rows([prompt])[0])
    assert reply.choices[0].finish_reason == ("stop" if ids[-1] == pipe.manifest.llm.eos_token_id else "length")
    pieces = [c.choices[0].delta.content or "" for c in _chat(client, model, image, prompt, max_tokens=6,
                                                              stream=True) if c.choices]
    assert "".join(pieces) == reply.choices[0].message.content  # (pieces at each step: tests/test_engine.py)
    sampled = _chat(client, model, image, n=2, seed=7, temperature=1.5, max_tokens=6)
    assert [c.message.content for c in sampled.choices] == [
        pipe.caption(image, do_sample=True, temperature=1.5, seed=s, max_new_tokens=6)[0] for s in (7, 8)]
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("blip2_")}
    assert values["blip2_image_cache_hits"] >= 4  # (one image: every request after the first)
    assert values["blip2_time_to_first_token_seconds_count"] >= 5 and values["blip2_generated_tokens_total"] > 0


def test_the_openai_clients_errors_are_its_exceptions(service):
    openai = pytest.importorskip("openai")
    url, pipe = service
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    image = probe_images(32, count=1, seed=12)[0]
    web = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}}] * 2}]
    chat = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}}]}]
    for messages, words in ((web, "fetches nothing"), (two, "exactly one"), (chat, "one user message")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model=model, messages=messages)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _chat(client, model, image, max_tokens=10**6)
    with pytest.raises(openai.NotFoundError, match=f"serves '{model}'"):
        _chat(client, "gpt-4o", image)
    text = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": text}}]}])
    assert e.value.status_code in (400, 415)


def test_bad_requests_get_400_with_the_python_api_message(service):
    url, pipe = service
    image = _b64(probe_images(32, count=1, seed=1)[0])
    status, body = _post(f"{url}/caption", {"image": base64.b64encode(b"not an image").decode()})
    assert status == 400 and "'image' is not an image PIL can read" in body["error"]
    with pytest.raises(PromptError) as empty:
        pipe.generate(probe_images(32, count=1)[0], prompt="  ")
    assert _post(f"{url}/ask", {"image": image, "prompt": "  "}) == (400, {"error": str(empty.value)})
    with pytest.raises(PromptError) as long:
        pipe.generate(probe_images(32, count=1)[0], prompt="a b " * 400)
    assert _post(f"{url}/ask", {"image": image, "prompt": "a b " * 400}) == (400, {"error": str(long.value)})
    status, body = _post(f"{url}/caption", {"image": image, "beams": 2})
    assert status == 400 and body["error"].startswith("unknown option 'beams' for /caption; options are:")
    with pytest.raises(PromptError) as beams:
        pipe.generate(probe_images(32, count=1)[0], num_beams=0)
    assert _post(f"{url}/caption", {"image": image, "num_beams": 0}) == (400, {"error": str(beams.value)})
    assert _post(f"{url}/caption", {"prompt": "x"})[0] == 400
    assert _post(f"{url}/caption", data=b"{not json")[0] == 400
    status, body = _post(f"{url}/nothing", {"image": image})
    assert status == 404 and body["error"].startswith("no such route here; POST to one of /caption")
    with pytest.raises(urllib.error.HTTPError) as get:
        urllib.request.urlopen(f"{url}/caption", timeout=30)
    assert get.value.code == 405 and get.value.headers["Allow"] == "POST"
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    assert 'route="other",status="404"' in metrics and "/nothing" not in metrics  # one series for every stray path
    status, body = _post(f"{url}/caption", {"image": "data:image/png;base64," + image, **GEN})  # a data URL
    assert status == 200 and body["caption"] == pipe.caption(probe_images(32, count=1, seed=1)[0], **GEN)[0]


def _raw(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send `head` (and `body`) on a socket of its own and return the status line: for requests urllib cannot make
    (a declared 48 MB body the server refuses before it is sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        return s.recv(200).split(b"\r\n", 1)[0]


def _multipart(fields: dict, file: bytes) -> tuple[bytes, str]:
    boundary = "x7boundary"
    out = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                   for k, v in fields.items())
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f'Content-Type: image/png\r\n\r\n').encode() + file + f"\r\n--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_hostile_and_careless_requests_get_a_4xx_before_any_expensive_work(service):
    """What an attacker or a careless client sends: each a 4xx naming the problem (never a 500), without the server's
    paths; the decompression bomb and the oversized body are refused from their header; a stalled body does not
    stop the replica answering."""
    url, pipe = service
    port = int(url.rsplit(":", 1)[1])
    png = _png(probe_images(32, count=1, seed=1)[0])
    image = base64.b64encode(png).decode()
    answers = []

    def post(body=None, data=None, headers=None, route="/caption"):
        status, payload = _post(f"{url}{route}", body, data, headers)
        answers.append(payload)
        return status, payload

    for bad in (-1, {}, 1.5, 2**50, [1, 2], None, True):
        assert post({"image": bad})[0] == 400, bad
    assert post(data=b"[" * 10_000)[0] == 400  # (json.loads: RecursionError, a 500 before)
    assert post(data=b'{"image": ' * 5_000)[0] == 400
    assert post({})[1]["error"].startswith("the request has no 'image'")
    status, body = post({"image": image, "num_beams": 32})  # (more beams than the folder's batch)
    assert status == 400 and "num_beams" in body["error"]
    assert post({"image": image, "max_new_tokens": 10**6})[0] == 400
    assert post({"image": image, "temperature": "hot"})[0] == 400
    started = time.perf_counter()
    status, body = post({"image": image, "prompt": "x" * 8_000_000}, route="/ask")  # refused by its length
    assert status == 400 and "prompt" in body["error"] and time.perf_counter() - started < 10
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 17 KB of PNG, 432 MB of RGB
    status, body = post({"image": base64.b64encode(bomb.getvalue()).decode()})
    assert status == 413 and "12000 x 12000" in body["error"] and "max_image_pixels" in body["error"]
    tiff = io.BytesIO()
    Image.new("RGB", (20, 20)).save(tiff, "TIFF")
    status, body = post({"image": base64.b64encode(tiff.getvalue()).decode()})
    assert status == 415 and "TIFF" in body["error"]
    assert post(data=b"abc", headers={"content-type": "text/plain"})[0] == 415
    data, kind = _multipart({f"f{i}": "1" for i in range(1100)}, png)
    assert post(data=data, headers={"content-type": kind})[0] == 400
    data, kind = _multipart({"prompt": "x" * (2 * 2**20)}, png)
    assert post(data=data, headers={"content-type": kind}, route="/ask")[0] == 400
    data, kind = _multipart({"prompt": "0", **GEN}, png)  # (a form field "0" is a prompt, not a number)
    assert post(data=data, headers={"content-type": kind}, route="/ask")[0] == 200
    assert _raw(port, b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 50331648\r\n\r\n", b"x" * 65536).split()[1] == b"413"
    assert post({"image": image},
                headers={"content-type": "application/json", "Origin": "http://evil.example"})[0] == 403
    assert post({"image": image}, headers={"content-type": "application/json", "Host": "attacker.example"})[0] == 421
    with socket.create_connection(("127.0.0.1", port), timeout=60) as stalled:  # a body that never comes
        stalled.sendall(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{")
        started = time.perf_counter()
        assert json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read()) == {"status": "ok"}
        assert time.perf_counter() - started < 5
    status, body = post({"image": image, "max_new_tokens": 999})  # (the limit's message names no server path)
    assert status == 400
    engine = str(Path(pipe.manifest.folder).resolve())
    leaked = [a for a in answers if engine in json.dumps(a) or str(Path(engine).parent.parent) in json.dumps(a)]
    assert not leaked and all(set(a) == {"error"} for a in answers if "caption" not in a and "answer" not in a)


def test_large_bodies_past_the_byte_budget_get_503_with_retry_after(service):
    """Large bodies at once: those the replica's byte budget (one --max-body-mb of bodies parsed at a time) cannot
    take at once are answered 503 with Retry-After (their bodies read and dropped, so the client gets the answer,
    not a closed connection) instead of waiting in the replica's memory."""
    url, _ = service
    noise = base64.b64encode(np.random.default_rng(0).integers(0, 255, 6 * 2**20, dtype=np.uint8).tobytes())
    body = b'{"image": "' + noise + b'"}'  # 8 MB: two fit in the default 20 MB budget

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _status_and_retry_after(f"{url}/caption", body), range(6)))
    assert {status for status, _ in answers} <= {400, 503}, answers  # (noise is no image: 400 once parsed)
    busy = [retry for status, retry in answers if status == 503]
    assert busy and all(retry == "1" for retry in busy), answers


def test_overload_is_answered_503_and_the_service_recovers(service):
    """96 concurrent clients against one replica: every request answered 200 or 503 (with Retry-After) within the
    timeout, none hangs, /health answers meanwhile, and the service answers normally afterwards."""
    url, pipe = service
    image = _b64(probe_images(32, count=1, seed=3)[0])

    body = json.dumps({"image": image, **GEN}).encode()
    with ThreadPoolExecutor(96) as pool:
        answers = list(pool.map(lambda _: _status_and_retry_after(f"{url}/caption", body), range(96)))
        started = time.perf_counter()
        assert json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read()) == {"status": "ok"}
        health = time.perf_counter() - started
    assert {s for s, _ in answers} <= {200, 503}, answers
    assert all(retry == "1" for s, retry in answers if s == 503)
    assert health < 10
    assert _post(f"{url}/caption", {"image": image, **GEN})[0] == 200


def test_a_seeded_request_answers_the_same_batched_or_alone(service):
    """Sampling draws from a generator per request: 8 concurrent copies of one seeded request (batched together)
    answer what it answers alone, over HTTP and in the Python API."""
    url, pipe = service
    image = probe_images(32, count=1, seed=4)[0]
    options = {"do_sample": True, "temperature": 1.5, "seed": 11, "max_new_tokens": 8}
    alone = pipe.caption(image, **options)[0]
    assert pipe.caption([image] * 4, **options) == [alone] * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _post(f"{url}/caption", {"image": _b64(image), **options}), range(8)))
    assert answers == [(200, {"caption": alone})] * 8


def test_a_replica_killed_under_load_is_replaced_and_no_request_hangs(service):
    """SIGKILL of the replica while requests are in flight: each gets an answer (200, or a 5xx for those it held)
    within the timeout, and the service answers normally again within 60 s."""
    url, _ = service
    image = _b64(probe_images(32, count=1, seed=6)[0])
    replica = int(subprocess.run(["pgrep", "-f", "ServeReplica:blip2"], capture_output=True, text=True)
                  .stdout.split()[0])

    def one(_):
        request = urllib.request.Request(f"{url}/caption", data=json.dumps({"image": image, **GEN}).encode(),
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:  # (Ray's proxy answers for a replica that died: its own plain text)
            return e.code

    with ThreadPoolExecutor(16) as pool:
        answers = pool.map(one, range(48))
        time.sleep(0.3)
        os.kill(replica, signal.SIGKILL)
        answers = list(answers)
    assert all(a == 200 or (isinstance(a, int) and a >= 500) for a in answers), answers
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if one(0) == 200:
            break
        time.sleep(1)
    else:
        pytest.fail("the service did not answer again within 60 s of its replica's SIGKILL")


class _Pipe:
    """A pipeline whose batch fails for one image: batches are retried one request at a time."""

    def generate(self, images, prompt=None, **options):
        if "bad" in images:
            raise RuntimeError("boom") if len(images) == 1 else PromptError("some row failed")
        return [f"caption of {i}" for i in images]


def test_one_failing_request_fails_alone_and_internal_errors_are_500():
    items = [Item("/caption", "a"), Item("/caption", "bad"), Item("/caption", "c"),
             Item("/caption", "d", options={"num_beams": 2})]
    out = answer_batch(_Pipe(), items)
    assert out[0] == "caption of a" and out[2] == "caption of c" and out[3] == "caption of d"
    assert isinstance(out[1], RuntimeError)
    status, body = reply("/caption", out[1])
    assert status == 500 and "boom" not in body["error"] and "RuntimeError" not in body["error"]
    assert reply("/caption", PromptError("empty"))[0] == 400 and reply("/caption", "x") == (200, {"caption": "x"})


def test_routes_options_and_the_serve_run_builder_are_checked_before_ray_starts(make_engine):
    """404 / 405 for requests the service has no handler for; replicas, batch wait and port checked by build_app
    and start, before any Ray; `serve run runtime.serve:app engines=...` (string options) builds the app."""
    from runtime.serve import start

    assert misrouted("POST", "/caption") is None and misrouted("GET", "/health") is None
    assert misrouted("GET", "/ask")[0::2] == (405, {"Allow": "POST"})
    assert misrouted("POST", "/metrics")[0::2] == (405, {"Allow": "GET"})
    assert misrouted("POST", "/caption/x")[0] == 404
    _, engine = make_engine("stage2text")
    for options, message in (({"replicas": 0}, "--replicas 0"), ({"batch_wait_ms": -1.0}, "--batch-wait-ms"),
                             ({"max_batch_size": 999}, "--max-batch-size 999 is outside")):
        with pytest.raises(ServeOptionError, match=message):
            start(str(engine), **options)
    with pytest.raises(ServeOptionError, match="--port 99999 is not a TCP port"):
        start(str(engine), port=99999)
    with pytest.raises(ServeOptionError, match="--providers: .*NoSuchExecutionProvider not available"):
        start(str(engine), providers=["NoSuchExecutionProvider"])
    assert type(app({"engines": str(engine), "max_batch_size": "2", "batch_wait_ms": "5"})).__name__ == "Application"
    with pytest.raises(ServeOptionError, match="not port"):
        app({"engines": str(engine), "port": "8000"})
    with pytest.raises(ServeOptionError, match="replicas='two' is not an int"):
        app({"engines": str(engine), "replicas": "two"})


def test_a_port_in_use_is_one_error_line(make_engine):
    _, engine = make_engine("stage2text")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "runtime", "serve", "--engines", str(engine), "--port", str(port)],
                             capture_output=True, text=True, timeout=180, env={**os.environ, "RAY_ADDRESS": "local"})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: could not listen on 127.0.0.1:{port}: the port is in use" in out.stderr


def test_ctrl_c_and_sigterm_stop_the_service_in_one_line_and_end_its_ray_instance(make_engine):
    """`python -m runtime serve` on a Ray instance of its own (RAY_ADDRESS=local): Ctrl-C prints one line after
    the serving line, nothing from Ray (serve.shutdown() made the raylet print one about its controller), exits
    130 as the other commands do, and the port stops answering; SIGTERM answers the requests in flight first; Ctrl-C
    while Ray is still starting prints the same line (serve.delete() raised there, with no Serve yet)."""
    _, engine = make_engine("stage2text")
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "runtime", "serve", "--engines", str(engine), "--port", str(port)]
    early = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    time.sleep(2)  # Ctrl-C while Ray is still starting: the same one line, no traceback
    os.killpg(early.pid, signal.SIGINT)
    out = early.communicate(timeout=120)[0]
    assert early.returncode == 130 and out.splitlines()[-1:] == ["stopped"] and "Traceback" not in out, out
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()[0]
                time.sleep(1)
        else:
            pytest.fail("the service did not answer /health within 180 s")
        time.sleep(1)  # (the serving line is printed after serve.run returns)
        # SIGTERM drains: requests in flight when it comes are answered before the service ends
        from runtime.manifest import load_manifest

        limits = load_manifest(engine).limits
        longest, count = limits.max_new_tokens, 3 * limits.max_batch  # (three batches' worth: some wait for rows)
        body = {"image": _b64(probe_images(32, count=1, seed=3)[0]), "max_new_tokens": longest,
                "min_new_tokens": longest, "do_sample": True}

        def timed(i):
            status = _post(f"http://127.0.0.1:{port}/caption", {**body, "seed": i})[0]
            return status, time.monotonic()

        with ThreadPoolExecutor(count) as pool:
            answers = [pool.submit(timed, i) for i in range(count)]
            wait(answers, return_when=FIRST_COMPLETED)  # the first batch is answered, the others still run or wait
            sent = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)  # `kill PID`: as Ctrl-C, exit 143 (Ray's handler dumped a stack before)
            results = [a.result() for a in answers]
        out, _ = proc.communicate(timeout=120)
        assert [status for status, _ in results] == [200] * count, results
        assert max(done for _, done in results) > sent  # (the case is real: answers came after the SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"serving {engine} on http://127.0.0.1:{port}"), out
    assert lines[1] == "stopped", out
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
