"""Headless Chromium driven over the Chrome DevTools Protocol (websocket-client), for the integration suite.

Only what the chart test needs: open a page, evaluate JavaScript (awaiting promises), take a PNG screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 30
CALL_TIMEOUT_S = 60


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools call or a script failed."""


def chromium_path() -> str | None:
    """CHROMIUM if set, else chromium / chromium-browser / google-chrome on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Browser:
    """One headless Chromium with one page; use as a context manager (the process ends on exit)."""

    def __init__(self, executable: str, profile_dir: Path, log_path: Path, width: int = 1400, height: int = 900):
        self.executable = executable
        self.profile_dir = profile_dir
        self.log_path = log_path
        self.size = (width, height)
        self.process: subprocess.Popen | None = None
        self.connection = None
        self.console: list[str] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        import websocket

        port = _free_port()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
        flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={self.profile_dir}"]
        flags += [f"--remote-debugging-port={port}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([self.executable, *flags], stdout=log, stderr=subprocess.STDOUT)
        page = self._page_target(port)
        self.connection = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=CALL_TIMEOUT_S, suppress_origin=True
        )
        self.call("Page.enable")
        self.call("Runtime.enable")
        width, height = self.size
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.connection is not None:
            self.connection.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _page_target(self, port: int) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"Chromium exited with code {self.process.returncode}: {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
                    targets = json.loads(response.read())
                return next(t for t in targets if t["type"] == "page")
            except (OSError, StopIteration, ValueError):
                time.sleep(0.2)
        raise BrowserError(f"Chromium's DevTools did not answer within {START_TIMEOUT_S} s: {self.log_path}")

    def call(self, method: str, **params) -> dict:
        """One DevTools command; console messages and page exceptions arriving meanwhile are kept in self.console."""
        call_id = next(self._ids)
        self.connection.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.connection.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message["result"]
            event = message.get("method")
            if event == "Runtime.consoleAPICalled":
                args = message["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif event == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.console.append("exception: " + details.get("exception", {}).get("description", details["text"]))

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (a promise is awaited); BrowserError if it throws."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description", details.get("text")))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.5):
        """Evaluate until the value is truthy (errors count as not yet); returns it, or BrowserError at the deadline."""
        deadline = time.monotonic() + timeout_s
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError as error:
                value, last_error = None, error
            if value:
                return value
            time.sleep(poll_s)
        raise BrowserError(f"{expression!r} stayed false for {timeout_s:.0f} s (last error: {last_error})")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path
