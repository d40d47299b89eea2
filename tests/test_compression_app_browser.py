"""The compression app in headless Chromium: load the page, fill the form, run, see the
compressed text and counts, save a screenshot (a test artifact under pytest's tmp dir).

Chromium is driven through its DevTools protocol over a pipe (--remote-debugging-pipe: JSON
messages ending in NUL on fds 3 and 4), so no WebSocket library or driver is needed. Without
Chromium the test skips with the reason, except under CI=true, where it fails.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,2000", "--remote-debugging-pipe"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "chromium is not installed (make browser installs Debian's package)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevTools:
    """A minimal DevTools client over --remote-debugging-pipe."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds():  # in the child: fd 3 reads our commands, fd 4 writes replies
            a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # move out of the way of 3 and 4
            b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}"],
                                     preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.js(expression):
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def url():
    from apps.compression_app import launch

    demo, url = launch(port=free_port(), block=False)
    yield url
    demo.close()


FILL = """(() => {
  const set = (el, v) => {
    const proto = el.tagName === 'TEXTAREA' ? HTMLTextAreaElement : HTMLInputElement;
    Object.getOwnPropertyDescriptor(proto.prototype, 'value').set.call(el, v);
    el.dispatchEvent(new Event('input', {bubbles: true}));
  };
  set(document.querySelector('#question textarea'), QUESTION);
  for (const label of document.querySelectorAll('#methods label')) {
    const box = label.querySelector('input');
    const want = METHODS.includes(label.textContent.trim());
    if (box.checked !== want) box.click();
  }
  return true;
})()"""


def test_fill_run_and_see_counts(url, tmp_path):
    tools = DevTools(chromium(), str(tmp_path / "profile"))
    try:
        target = tools.send("Target.createTarget", url=url)["targetId"]
        tools.session = tools.send("Target.attachToTarget", targetId=target,
                                   flatten=True)["sessionId"]
        tools.send("Page.enable")
        tools.wait("!!document.querySelector('#run') && "
                   "!!document.querySelector('#question textarea')", 60, "the form")
        question = "What is the access code for the vault?"
        methods = ["truncate", "sentence-bm25", "sentence-minilm"]
        fill = FILL.replace("QUESTION", json.dumps(question)).replace("METHODS",
                                                                      json.dumps(methods))
        assert tools.js(fill)
        assert tools.js("document.querySelector('#question textarea').value") == question
        tools.js("document.querySelector('#run').click()")
        tools.wait("document.querySelectorAll('#panel .col').length === 3 && "
                   "document.querySelector('#panel').innerText.includes('Answer')", 300,
                   "three result columns with answers")
        panel = tools.js("document.querySelector('#panel').innerText")
        table = tools.js("document.querySelector('#table').innerText")
        shot = tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path = tmp_path / "compression_app.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {path}")
    finally:
        tools.close()
    for m in methods:
        assert m in panel and m in table
    assert "achieved" in panel and "requested" in panel and "Compressed prompt" in panel
    assert "Answer without compression" in panel
    assert path.stat().st_size > 10_000
