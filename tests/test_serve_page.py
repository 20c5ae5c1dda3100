"""The chat page in a real browser: Playwright driving Debian's chromium, headless, against a server on
127.0.0.1. Type a question, see the streamed answer grow, press stop mid-answer (the server frees the slot),
go on with a second turn that carries the history, new chat; text is shown as text (no HTML injection) and
code blocks are preformatted; a screenshot is taken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmforge
from tests.fixtures.tiny import make_tiny

sync_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from lmforge.serve.app import create_app  # noqa: E402  (needs the serve extra)
from tests.test_serve_api import running, slowed, wait_until  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def url(tiny_tokenizer):
    model = make_tiny(tiny_tokenizer.vocab_size, max_seq_len=512, init_std=0.2)
    app = create_app(slowed(model, 0.03), tiny_tokenizer, "tiny", slots=2, context=512)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api.expect.set_options(timeout=TIMEOUT_MS)  # expect's own default is 5 s: short on a busy machine
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_stops_keeps_history_and_shows_text_as_text(url, browser, tmp_path):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.set_default_timeout(TIMEOUT_MS)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(url)
    expect(page.locator("#model")).to_have_text("model: tiny")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "200")
    page.fill("#system", "Be brief.")

    question = 'Hi <img src=x onerror="window.pwned=1"> see:\n```py\nprint("<b>bold?</b>")\n```'
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 3")
    page.click("#stop")  # mid-answer: 200 tokens at >= 30 ms a step take >= 6 s
    expect(reply.locator(".note")).to_have_text("(stopped)")
    expect(page.locator("#send")).to_be_enabled()
    assert wait_until(lambda: httpx.get(url + "/health").json()["busy"] == 0, 20)  # the slot is free again
    assert 'reason="cancelled"' in httpx.get(url + "/metrics").text
    first_reply = reply.locator(".body").inner_text()
    assert first_reply

    user = page.locator(".msg.user").first
    assert user.locator("img").count() == 0 and page.evaluate("window.pwned") is None  # text, not HTML
    assert '<img src=x onerror="window.pwned=1">' in user.inner_text()
    assert user.locator("pre code").inner_text() == 'print("<b>bold?</b>")\n'
    assert user.locator("b").count() == 0

    page.fill("#max-tokens", "3")
    page.fill("#prompt", "again")
    page.click("#send")
    expect(page.locator(".msg.assistant.done")).to_have_count(2)
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[-1]["messages"][2]["content"] == first_reply
    assert sent[-1]["stream"] is True and sent[-1]["max_tokens"] == 3 and sent[-1]["temperature"] == 0
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    page.close()


def test_chat_page_asks_for_the_key_when_the_server_needs_one(tiny_folder, browser):
    model, tok = lmforge.load(tiny_folder, device="cpu")
    with running(create_app(model, tok, "tiny", api_key="sesame", slots=1, context=64)) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        sync_api.expect(page.locator("#model")).to_contain_text("API key")
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        sync_api.expect(page.locator("#model")).to_have_text("model: tiny")
        page.fill("#max-tokens", "3")
        page.fill("#prompt", "hi")
        page.press("#prompt", "Enter")
        sync_api.expect(page.locator(".msg.assistant.done")).to_have_count(1)
        assert page.locator(".msg.error").count() == 0
        page.close()
