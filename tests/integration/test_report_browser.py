"""`harness report`'s page in a real browser: headless Chromium opens index.html itself; no console
error, every figure decodes, and a screenshot of the page is taken.

The page is inspected over the Chrome DevTools Protocol on `--remote-debugging-pipe` (JSON
messages ending in NUL on file descriptors 3 and 4), so neither a WebDriver nor a WebSocket
client is needed. Chromium is Debian's package, installed with apt-get when it is missing."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from report_store import SCENARIO, build_synthetic_store

from harness.cli import main

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless=new",
    "--disable-gpu",
    "--no-sandbox",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chromium() -> Path:
    """Debian's chromium, installed with apt-get if missing (skips where that cannot be)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium")
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(cmd)}` did not finish in 20 minutes")
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout)[-500:]}")
    if not CHROMIUM.exists():
        pytest.skip(f"apt-get installed chromium, but not as {CHROMIUM}")
    return CHROMIUM


class DevTools:
    """One Chromium over `--remote-debugging-pipe`: send commands, collect every event."""

    def __init__(self, chromium: Path, profile: Path, log: Path) -> None:
        to_chrome, self._write = os.pipe()  # Chromium reads commands on its fd 3
        self._read, from_chrome = os.pipe()  # and writes replies and events on its fd 4

        def fds_3_and_4() -> None:  # in the child: above 10 first, so neither is clobbered
            a, b = (
                fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10),
                fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10),
            )
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                str(chromium),
                *FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(3, 4),
            preexec_fn=fds_3_and_4,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf, self._next = b"", 0
        self.events: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise ConnectionError(f"Chromium closed the pipe (exit {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)
        self._log.close()


# Read (never changed) in the page once it has loaded: its title and each image's state;
# `decode()` rejects for an image that cannot be decoded.
INSPECT = """
Promise.all(Array.from(document.images, img => img.decode().then(() => true, () => false)))
  .then(decoded => JSON.stringify({
    title: document.title,
    images: Array.from(document.images, (img, i) => ({
      alt: img.alt, complete: img.complete, width: img.naturalWidth,
      height: img.naturalHeight, decoded: decoded[i], data: img.src.startsWith("data:")})),
    headings: Array.from(document.querySelectorAll("h3"), h => h.textContent),
  }))
"""


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors (SEVERE in WebDriver's words), uncaught exceptions, failed loads."""
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif method == "Runtime.exceptionThrown":
            out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log {entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
    return out


def test_report_page_in_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    store, out = tmp_path / "store", tmp_path / "report"
    build_synthetic_store(store)
    assert main(["report", str(store), "--out", str(out)]) == 0
    page = (out / "index.html").resolve()
    pngs = sorted((out / "figures").glob("*.png"))

    browser = DevTools(chromium, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session)
        browser.send("Page.navigate", session, url=page.as_uri())
        browser.wait_for("Page.loadEventFired")
        result = browser.send(
            "Runtime.evaluate", session, expression=INSPECT, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result
        seen = json.loads(result["result"]["value"])
        browser.send("Runtime.evaluate", session, expression="0")  # drain late events
    finally:
        browser.close()

    assert _errors(browser.events) == []
    assert seen["title"].startswith("wmbench report"), seen["title"]
    assert len(seen["images"]) == len(pngs) >= 6
    broken = [
        i
        for i in seen["images"]
        if not (i["complete"] and i["width"] > 0 and i["height"] > 0 and i["decoded"])
    ]
    assert broken == []
    assert all(i["data"] for i in seen["images"])  # embedded, nothing fetched
    assert any("Decision statistics" in h for h in seen["headings"])
    assert f"Scenario {SCENARIO}" in page.read_text()

    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            str(chromium),
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile-shot'}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 2000)
    assert len(data) > 50_000  # a page of text, tables and figures, not a blank canvas
    print(f"\nscreenshot: {shot} ({len(data):,} bytes, {width}x{height})")
