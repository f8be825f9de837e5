"""The web server's outer door: slowed sign-in after repeated failures, page events closed to calls by name, and
404 for a shown file that was deleted.

All are one ASGI middleware in front of Gradio's routes, since Gradio's own sign-in sees neither the caller's
address nor how often it failed, it runs every event by name, page wiring included, and it answers 403 for any
missing file.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

FREE_FAILURES = 5  # failed sign-ins a user or an address may make before each next try waits
FIRST_DELAY_S = 1.0  # the wait of the first slowed try; it doubles with every further failure ...
MAX_DELAY_S = 60.0  # ... up to this
FORGET_AFTER_S = 15 * 60  # failures older than this no longer count
MAX_KEYS = 10_000  # users and addresses remembered before the stale ones are dropped

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class LoginThrottle:
    """Counts failed sign-ins per user and per address; a try after too many waits longer each time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def delay(self, keys: Iterable[str]) -> float:
        """The wait before this try, from the worst of its keys; the try counts as a failure until it succeeds,
        so many tries at once cannot share one count."""
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > MAX_KEYS:  # many names tried: forget the stale ones, so memory stays bounded
                self._failures = {key: times for key, times in self._failures.items()
                                  if times and now - times[-1] < FORGET_AFTER_S}
            counts = []
            for key in keys:
                recent = [t for t in self._failures.get(key, []) if now - t < FORGET_AFTER_S]
                counts.append(len(recent))
                self._failures[key] = [*recent, now]
        extra = max(counts, default=0) - FREE_FAILURES
        return 0.0 if extra < 0 else min(FIRST_DELAY_S * 2 ** extra, MAX_DELAY_S)

    def succeeded(self, keys: Iterable[str]) -> None:
        """A right password clears the counts of its user and address."""
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


class Guard:
    """ASGI middleware: throttles ``POST /login``, refuses ``/call/NAME`` for names that are not public API
    endpoints (the page reaches its own events another way; every handler checks its caller as well), and answers
    404 for a file of ``shown_dir`` that is gone."""

    def __init__(self, app: Callable, public_names: Callable[[], set[str]], shown_dir: Path,
                 throttle: LoginThrottle | None = None) -> None:
        self.app = app
        self.public_names = public_names
        self.shown_dir = shown_dir.resolve()
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/")
        if scope.get("method") == "POST" and path.endswith("/login"):
            await self._login(scope, receive, send)
            return
        name = path.rpartition("/call/")[2] if "/call/" in path else None
        if name is not None and name.split("/")[0] not in self.public_names():
            await _answer(send, 404, {"detail": f"There is no API endpoint /{name.split('/')[0]}."})
            return
        if "/file=" in path and self._deleted(path.partition("/file=")[2]):
            await _answer(send, 404, {"detail": "This file was deleted."})
            return
        await self.app(scope, receive, send)

    def _deleted(self, target: str) -> bool:
        """Whether a file URL points into the shown files at one that is no longer there."""
        try:
            resolved = Path(target).resolve()
            return self.shown_dir in resolved.parents and not resolved.exists()
        except (ValueError, OSError):
            return False

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, messages = b"", []
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        user = (parse_qs(body.decode("utf-8", "replace")).get("username") or [""])[0].strip()
        keys = [f"user {user}", f"address {(scope.get('client') or ('?',))[0]}"]
        wait = self.throttle.delay(keys)
        if wait:
            await asyncio.sleep(wait)

        async def replay() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 200:
                self.throttle.succeeded(keys)
            await send(message)

        await self.app(scope, replay, watch)


async def _answer(send: Send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
