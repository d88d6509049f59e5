"""/admin and /chat in a real headless Chromium (Debian's, driven by Playwright; no browser download),
against `mlx-flash serve --workers 2` and the demo model. Screenshots go to $MLX_FLASH_ARTIFACTS
(default target/screenshots/)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import Sidecar, run_sidecar

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MLX_FLASH_ARTIFACTS", ROOT / "target" / "screenshots"))
# Bans the demo model's end-of-turn token, so a reply runs to max_tokens: long enough to watch and stop.
NO_EOS = {"logit_bias": {"2": -100}, "max_tokens": 600}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with run_sidecar(tmp_path_factory.mktemp("webui") / "sidecar.log", "--model", "demo") as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser context and page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    p = Page(browser)
    yield p
    p.close()


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def chat(sidecar: Sidecar, max_tokens: int) -> None:
    """A request that generates exactly `max_tokens` tokens."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    body = {"model": "demo", "messages": messages, **NO_EOS, "max_tokens": max_tokens}
    httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, timeout=60).raise_for_status()


def test_admin_draws_live_charts_and_restarts_a_worker(sidecar: Sidecar, page: Page) -> None:
    p = page.page
    p.goto(f"{sidecar.url}/admin")
    # Traffic while the page polls: the charts must show it.
    for _ in range(6):
        chat(sidecar, 48)
        time.sleep(0.3)

    def series(name: str, i: int) -> list[float | None]:
        return list(p.evaluate(f"charts.{name}.data[{i}]"))

    wait_for(lambda: any(v and v > 0 for v in series("tokens", 1)), what="tokens/s above 0")
    assert any(v is not None and v > 0 for v in series("latency", 1) + series("latency", 2))
    assert all(v is not None and v > 0 for v in series("memory", 2))  # available memory, every point
    drawn = p.evaluate(
        """() => [...document.querySelectorAll('canvas')].map(c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let ink = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) ink++;
            return ink; })"""
    )
    assert len(drawn) == 3 and all(ink > 500 for ink in drawn), drawn
    assert p.locator("#workers tbody tr").count() == 2
    assert p.locator('#models tr[data-model="demo"] .status').inner_text() == "loaded"
    page.shot("admin")

    before = {w["id"]: w for w in sidecar.workers()}["worker-0"]
    p.locator('tr[data-worker="worker-0"] button', has_text="Restart").click()
    wait_for(
        lambda: {w["id"]: w for w in sidecar.workers()}["worker-0"]["restarts"] == before["restarts"] + 1,
        what="the restart to reach the sidecar",
    )
    sidecar.wait_ready(2)
    after = {w["id"]: w for w in sidecar.workers()}["worker-0"]
    assert after["pid"] != before["pid"]
    row = p.locator('tr[data-worker="worker-0"]')
    wait_for(
        lambda: (
            row.locator(".restarts").inner_text() == str(after["restarts"])
            and row.locator(".state").inner_text() == "ready"
        ),
        what="the table to show the restarted worker ready",
    )
    page.shot("admin-after-restart")
    assert page.errors == []


def watch_reply(p: Any) -> None:
    """Record the length of the streaming reply each time the DOM changes."""
    p.evaluate(
        """() => { window.lengths = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.message.assistant .body');
            if (bodies.length) window.lengths.push(bodies[bodies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true}); }"""
    )


def test_chat_streams_token_by_token_and_stop_cancels(sidecar: Sidecar, page: Page) -> None:
    p = page.page
    p.goto(f"{sidecar.url}/chat")
    wait_for(lambda: p.locator("#model option").count() >= 1, what="the model list")
    assert p.locator("#model").input_value() == "demo"

    watch_reply(p)
    p.fill("#prompt", "What is 17+25?")
    p.press("#prompt", "Enter")
    wait_for(lambda: p.locator("#send").is_enabled() and "tok/s" in p.inner_text("#status"), what="the reply")
    assert p.locator(".message.assistant .body").last.inner_text() == "42"

    # The page's own request, with the end-of-turn token banned on its way out.
    def endless(route: Any) -> None:
        route.continue_(post_data=json.dumps({**route.request.post_data_json, **NO_EOS}))

    p.route("**/v1/chat/completions", endless)
    p.fill("#prompt", "Tell me a story.")
    p.click("#send")
    # Several separate DOM updates, each a little more text: streamed, not delivered at once.
    wait_for(lambda: len(set(p.evaluate("window.lengths"))) >= 8, what="the reply to stream")
    page.shot("chat-streaming")
    p.click("#stop")
    wait_for(lambda: p.inner_text("#status") == "stopped", what="the stop")
    stopped = p.locator(".message.assistant .body").last.inner_text()
    assert stopped
    # The server let go of the generation: nothing in flight, and the text does not grow.
    status = f"{sidecar.url}/admin/api/status"
    wait_for(lambda: httpx.get(status).json()["in_flight"] == 0, what="nothing in flight")
    time.sleep(1)
    assert p.locator(".message.assistant .body").last.inner_text() == stopped
    page.shot("chat-stopped")

    # The conversation survives a reload (localStorage).
    p.reload()
    wait_for(lambda: p.locator(".message").count() == 4, what="the restored conversation")
    p.click("#new-chat")
    assert p.locator(".message").count() == 0
    assert page.errors == []


def test_pages_ask_for_the_api_key_once(browser: Any, tmp_path: Path) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", "demo", "--api-key=sekret", workers=1) as s:
        page = Page(browser)
        try:
            p = page.page
            p.goto(f"{s.url}/chat")
            p.wait_for_selector("#key-dialog[open]")
            p.fill("#key-input", "wrong")
            p.click("#key-dialog button")
            wait_for(lambda: "refused" in p.inner_text("#key-message"), what="the refusal")
            p.fill("#key-input", "sekret")
            p.click("#key-dialog button")
            wait_for(lambda: p.locator("#model option").count() >= 1, what="the model list")
            assert p.evaluate("sessionStorage.getItem('mlx-flash-api-key')") == "sekret"
            p.fill("#prompt", "What is 17+25?")
            p.press("#prompt", "Enter")
            wait_for(lambda: "tok/s" in p.inner_text("#status"), what="the reply")
            assert p.locator(".message.assistant .body").last.inner_text() == "42"
            # The admin page in the same session uses the stored key without asking.
            p.goto(f"{s.url}/admin")
            wait_for(lambda: p.locator("#workers tbody tr").count() == 1, what="the workers table")
            assert not p.locator("#key-dialog").evaluate("d => d.open")
            page.shot("api-key")
            # The wrong key's 401s are console errors of their own; nothing else may be.
            assert [e for e in page.errors if "401" not in e] == []
        finally:
            page.close()
