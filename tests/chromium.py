"""Headless Chromium over the DevTools protocol: open a page, collect errors, evaluate, screenshot.

Shared by the tests of the pages kaedama writes (the dedup review, the evaluation report).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import stop_process

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-allow-origins=*",
    "--remote-debugging-port=0",
]


def chromium() -> str:
    """The Chromium executable; skips the test where none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (apt-get install -y chromium)")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        websocket = pytest.importorskip("websocket", reason="needs websocket-client for CDP")
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, **params) -> int:
        """Send a command without waiting for its answer; returns its id."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        return self.next_id

    def _record(self, message: dict) -> None:
        self.events.append(message)
        if message.get("method") == "Target.attachedToTarget":
            # An out-of-process frame (a sandboxed iframe) waits for us: watch its console too.
            sid = message["params"]["sessionId"]
            for domain in ("Runtime", "Log"):
                self.send(f"{domain}.enable", session=sid)
            self.send("Runtime.runIfWaitingForDebugger", session=sid)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        sent = self.send(method, session, **params)
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def wait_for(self, event: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout} s")
            self._record(json.loads(self.ws.recv()))

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                exception = details.get("exception", {})
                out.append(f"{details.get('text', '')} {exception.get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(json.dumps(params.get("args", []))[:300])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def evaluate(self, expression: str, session: str | None = None):
        """The JSON value of a JavaScript expression that returns ``JSON.stringify(...)``."""
        result = self.call("Runtime.evaluate", session, returnByValue=True, expression=expression)
        return json.loads(result["result"]["value"])

    def frame_sessions(self) -> list[str]:
        """Sessions of the out-of-process iframes attached so far (``open_page(frames=True)``)."""
        return [
            e["params"]["sessionId"]
            for e in self.events
            if e.get("method") == "Target.attachedToTarget"
            and e["params"]["targetInfo"].get("type") == "iframe"
        ]


@contextlib.contextmanager
def browser(tmp_path: Path) -> Iterator[str]:
    """Start headless Chromium; yields the DevTools HTTP endpoint."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def open_page(
    page: Path,
    tmp_path: Path,
    *,
    width: int = 1280,
    height: int = 900,
    frames: bool = False,
    downloads: Path | None = None,
) -> Iterator[DevTools]:
    """Open ``page`` (a local file) in headless Chromium and wait for its load event.

    ``frames=True`` attaches to out-of-process iframes (sandboxed ones are) before they
    run, so their console errors are collected and :meth:`DevTools.frame_sessions`
    can evaluate inside them. ``downloads``: the folder the page's downloads are saved in.
    """
    with browser(tmp_path) as endpoint:
        with urllib.request.urlopen(f"{endpoint}/json/list", timeout=10) as response:
            targets = json.load(response)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        tools = DevTools(ws_url)
        try:
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable")
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            if downloads is not None:
                tools.call(
                    "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads)
                )
            if frames:
                tools.call(
                    "Target.setAutoAttach",
                    autoAttach=True,
                    waitForDebuggerOnStart=True,
                    flatten=True,
                )
            tools.call("Page.navigate", url=page.resolve().as_uri())
            tools.wait_for("Page.loadEventFired")
            yield tools
        finally:
            tools.ws.close()


def screenshot(tools: DevTools, path: Path, *, full_page: bool = False) -> Path:
    """Save a PNG screenshot of the open page (the viewport, or the whole page)."""
    params: dict = {"format": "png"}
    if full_page:
        metrics = tools.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        params.update(
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
    data = tools.call("Page.captureScreenshot", **params)["data"]
    path.write_bytes(base64.b64decode(data))
    return path
