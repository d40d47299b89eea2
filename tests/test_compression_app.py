"""The compression app as a user meets it: through gradio_client (the API returns what the UI
shows) and in headless Chromium (tests/test_compression_app_browser.py)."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.slow

gradio_client = pytest.importorskip("gradio_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    from apps.compression_app import examples, launch

    demo, url = launch(port=free_port(), block=False)
    yield url, examples()
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app[0], verbose=False)


def _needle(app):
    ex = app[1]
    return ex[next(k for k in ex if k.startswith("needle"))]


def test_api_returns_what_the_ui_shows(app, client):
    document, question = _needle(app)
    methods = ["truncate", "sentence-bm25"]
    table, panel, details = client.predict(document, question, methods, 5, True,
                                           api_name="/compress")
    assert [m["method"] for m in details["methods"]] == methods
    assert details["answer_uncompressed"]
    rows = table["data"]
    for row, m in zip(rows, details["methods"], strict=True):
        assert row[0] == m["method"] and row[5] == m["compressed_tokens"]
        assert abs(m["achieved_ratio"] / m["requested_ratio"] - 1) <= 0.05
        assert f'data-method="{m["method"]}"' in panel
        assert f'{m["compressed_tokens"]} / {m["original_tokens"]} tokens' in panel
        assert m["text"][:40].replace("&", "&amp;").replace("<", "&lt;") in panel or \
            m["text"][:40] in panel
        assert "<mark>" in panel and m["answer"] == row[-1]
    bm25 = details["methods"][1]
    assert any(c.isdigit() for c in bm25["text"])


@pytest.mark.parametrize("document, ratio, methods, message", [
    ("   ", 5, ["truncate"], "empty"),
    ("Some text. " * 50, 50, ["truncate"], "out of range|greater than maximum"),
    ("Some text. " * 50, 5, [], "at least one"),
    ("word " * 7000, 5, ["truncate"], "more than"),
])
def test_input_limits_have_clear_messages(client, document, ratio, methods, message):
    with pytest.raises(Exception, match=message):
        client.predict(document, "What?", methods, ratio, False, api_name="/compress")


def test_queue_serves_concurrent_users(app, client):
    document, question = _needle(app)
    jobs = [client.submit(document, question, ["sentence-bm25"], r, False, api_name="/compress")
            for r in (4, 8)]
    results = [job.result(timeout=300) for job in jobs]
    assert [round(r[2]["methods"][0]["requested_ratio"]) for r in results] == [4, 8]
