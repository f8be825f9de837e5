"""Run the real app on a free local port and drive it with Debian's chromium through Playwright."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
# one PyTorch thread and no refitting: sums add up in one order, so losses compare bit for bit across runs and
# processes, and a run never fights a parallel test worker for the cores
SAME_THREADS = {"LORA_GRADIO_DEFAULT_THREADS": "1", "OMP_NUM_THREADS": "1"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(workspace: Path, *flags: str, env: dict[str, str] | None = None, timeout: float = 90,
                root: Path = ROOT):
    """Start ``python app.py`` of ``root`` on 127.0.0.1 (with extra ``flags`` and environment) and yield its URL;
    stop it afterwards. Its output goes to ``app-PORT.log`` beside the workspace."""
    port = free_port()
    log = (workspace.parent / f"app-{port}.log").open("w")
    process = subprocess.Popen([sys.executable, str(root / "app.py"), "--port", str(port), "--workspace",
                                str(workspace), *flags], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"app did not start: {Path(log.name).read_text()[-2000:]}") from None
                time.sleep(0.5)
        running_app.pid = process.pid
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:  # a starved host (CI's background checks) may not stop in time
            process.kill()
            process.wait()
        log.close()


@contextmanager
def browser_pages(count: int = 1, size: tuple[int, int] = (1024, 768)):
    """Headless chromium pages at a small laptop's size (or ``size``), each in its own context: separate visitors,
    separate local storage."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            viewport = {"width": size[0], "height": size[1]}
            pages = [browser.new_context(viewport=viewport).new_page() for _ in range(count)]
            for page in pages:
                page.set_default_timeout(60_000)
            yield pages
        finally:
            browser.close()


@contextmanager
def browser_page():
    """One visitor's page."""
    with browser_pages(1) as (page,):
        yield page


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def shown_text(page, selector: str) -> str:
    """The text a person sees in a Markdown or HTML block: its content, without the status tracker that Gradio keeps
    (hidden) beside a block that a timer updates."""
    return page.locator(f"{selector} [data-testid=markdown], {selector} .prose").first.inner_text()


def raw_call(url, endpoint, values, session=None):
    """An endpoint called with a JSON body that gradio_client would not send (NaN, null, huge numbers), as any
    script may (``session``: an httpx client holding a login); returns the error message, or the event's kind when
    there is none."""
    import httpx

    http = session or httpx.Client(timeout=120)
    event = http.post(f"{url}gradio_api/call/{endpoint}", content='{"data": [' + values + "]}",
                      headers={"content-type": "application/json"}).json()["event_id"]
    kind, data = http.get(f"{url}gradio_api/call/{endpoint}/{event}", timeout=120).text.split("\n", 1)
    return json.loads(data.removeprefix("data: "))["error"] if kind == "event: error" else kind
