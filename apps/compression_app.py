"""Prompt compression, side by side: a Gradio app over `workbench.compression`.

    python -m apps.compression_app [--port 7860] [--host 127.0.0.1]

Choose an example (real text from Python's documentation with a planted fact) or paste a
document, ask a question, pick methods and a target ratio. For each method the app shows the
compressed prompt, the original with the kept text highlighted, requested vs achieved tokens and
ratio, the compressor's own time, and the reader's answer with and without compression. The reader
is the embedded SmolLM2-135M-Instruct, or an OpenAI-compatible endpoint when
WORKBENCH_OPENAI_BASE_URL is set. One queue serializes the work, so concurrent users wait their
turn instead of sharing the model mid-run.
"""

from __future__ import annotations

import argparse
import html

import gradio as gr

from workbench.compression import DESCRIPTIONS, METHODS, compress
from workbench.compression.base import count_tokens
from workbench.errors import WorkbenchError
from workbench.widgets.compression import highlight as highlight_html

MAX_DOC_TOKENS = 6000   # the model has 8,192 positions: room for the question, answer, summary
MIN_RATIO, MAX_RATIO = 1.0, 20.0
DEFAULT_METHODS = ["truncate", "sentence-bm25", "sentence-minilm", "llmlingua"]
PASTE = "(paste your own)"
COLUMNS = ["method", "requested ratio", "achieved ratio", "original tokens", "budget tokens",
           "compressed tokens", "compressor s", "answer"]


def _tokenizer():
    from workbench.models import load_model

    return load_model()[1]


def examples() -> dict[str, tuple[str, str]]:
    """Example name -> (document, question): the quick benchmark items (real text)."""
    from workbench.compression.tasks import build_items

    return {f"{i.task}: {i.id}": (i.context, i.question)
            for i in build_items(_tokenizer(), "quick")}


def check_inputs(document: str, question: str, methods: list[str], ratio) -> int:
    """Raise a WorkbenchError that says what to change; return the document's token count."""
    if not document or not document.strip():
        raise WorkbenchError("The document is empty: paste some text or choose an example.")
    if not methods:
        raise WorkbenchError("Choose at least one compression method.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise WorkbenchError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise WorkbenchError(f"The target ratio must be a number, got {ratio!r}.") from None
    if not MIN_RATIO <= ratio <= MAX_RATIO:
        raise WorkbenchError(f"The target ratio {ratio:g} is out of range: choose "
                             f"{MIN_RATIO:g} to {MAX_RATIO:g}.")
    n = count_tokens(_tokenizer(), document)
    if n > MAX_DOC_TOKENS:
        raise WorkbenchError(f"The document has {n:,} tokens, more than the {MAX_DOC_TOKENS:,} "
                             "this app accepts (the reader's window is 8,192 positions, and the "
                             "question, answer and summaries need room). Shorten it.")
    if question and len(question) > 1000:
        raise WorkbenchError("The question is longer than 1,000 characters: shorten it.")
    return n


def highlight(document: str, spans: list[tuple[int, int]]) -> str:
    """The document as HTML with kept spans in <mark> and dropped text greyed (CSS below)."""
    return highlight_html(document, spans, drop_attr='class="drop"', mark_attr="")


def _answer(chat, context: str, question: str) -> str:
    reply = chat.chat(f"{context}\n\n{question}", max_tokens=48, stop=["\n\n"])
    return reply.text.strip()


def run(document: str, question: str, methods: list[str], ratio: float, answer: bool = True):
    """Compress with each method; returns (table rows, HTML panel, JSON details)."""
    try:
        check_inputs(document, question, methods, ratio)
        question = (question or "").strip() or None
        chat = None
        if answer and question:
            from workbench.llm import get_backend

            chat = get_backend()
        details = {"question": question, "ratio": float(ratio), "methods": []}
        if chat is not None:
            details["answer_uncompressed"] = _answer(chat, document, question)
            details["reader"] = chat.model_name
        for method in methods:
            r = compress(document, question, float(ratio), method, _tokenizer())
            item = {**r.summary(), "text": r.text, "kept_spans": r.kept_spans,
                    "description": DESCRIPTIONS[method]}
            if chat is not None:
                item["answer"] = _answer(chat, r.text, question)
            details["methods"].append(item)
    except WorkbenchError as err:
        raise gr.Error(str(err)) from None
    return table(details), panel(document, details), details


def table(details: dict) -> list[list]:
    rows = []
    for m in details["methods"]:
        rows.append([m["method"], m["requested_ratio"], m["achieved_ratio"], m["original_tokens"],
                     m["budget_tokens"], m["compressed_tokens"], m["seconds"],
                     m.get("answer", "")])
    return rows


def panel(document: str, details: dict) -> str:
    """Side-by-side columns: compressed prompt, counts, answer, kept text highlighted."""
    cols = []
    for m in details["methods"]:
        kept = (highlight(document, m["kept_spans"]) if m["kept_spans"] else
                "<i>A generated summary: no original text is kept verbatim.</i>")
        answer = (f'<div class="answer"><b>Answer:</b> {html.escape(m["answer"])}</div>'
                  if "answer" in m else "")
        cols.append(
            f'<div class="col" data-method="{m["method"]}"><h4>{m["method"]}</h4>'
            f'<div class="desc">{html.escape(m["description"])}</div>'
            f'<div class="counts">{m["compressed_tokens"]} / {m["original_tokens"]} tokens '
            f'(budget {m["budget_tokens"]}); ratio {m["achieved_ratio"]:.2f}x achieved vs '
            f'{m["requested_ratio"]:.2f}x requested; compressor {m["seconds"]:.2f} s</div>'
            f'{answer}<div class="label">Compressed prompt</div>'
            f'<pre class="compressed">{html.escape(m["text"])}</pre>'
            f'<div class="label">Kept text in the original</div><pre class="kept">{kept}</pre>'
            "</div>")
    head = ""
    if "answer_uncompressed" in details:
        head = (f'<div class="answer"><b>Answer without compression</b> '
                f'({html.escape(details["reader"])}): '
                f'{html.escape(details["answer_uncompressed"])}</div>')
    return f'{head}<div class="cols">{"".join(cols)}</div>'


CSS = """
.cols {display: flex; gap: 12px; overflow-x: auto;}
.col {flex: 1 0 300px; border: 1px solid #ddd; border-radius: 6px; padding: 8px;}
.col pre {white-space: pre-wrap; max-height: 320px; overflow-y: auto; font-size: 12px;}
.col mark {background: #ffe58a;} .col .drop {color: #aaa;}
.counts, .desc, .label {font-size: 12px; color: #555;} .answer {margin: 6px 0;}
"""


def build() -> gr.Blocks:
    """The app (not launched)."""
    ex = examples()
    first = next(iter(ex))
    with gr.Blocks(title="Prompt compression") as demo:
        gr.Markdown("# Prompt compression, side by side\n"
                    "Extractive, abstractive and token-pruning compressors on the same document "
                    "and question, at the same target ratio. Token counts use the reader's "
                    "tokenizer; the question is never compressed.")
        with gr.Row():
            choice = gr.Dropdown([*ex, PASTE], value=first, label="Example document")
            ratio = gr.Slider(MIN_RATIO, MAX_RATIO, value=5, step=0.5, label="Target ratio (x)")
        document = gr.Textbox(ex[first][0], lines=8, max_lines=16, label="Document",
                              elem_id="document")
        question = gr.Textbox(ex[first][1], label="Question", elem_id="question")
        with gr.Row():
            methods = gr.CheckboxGroup(list(METHODS), value=DEFAULT_METHODS, label="Methods",
                                       elem_id="methods")
            answer = gr.Checkbox(True, label="Answer with the reader (slower)")
        go = gr.Button("Compress", variant="primary", elem_id="run")
        results = gr.Dataframe(headers=COLUMNS, label="Requested vs achieved", elem_id="table",
                               interactive=False)
        view = gr.HTML(elem_id="panel")
        with gr.Accordion("Details (what the API returns)", open=False):
            raw = gr.JSON()

        def pick(name):
            if name == PASTE:
                return "", ""
            return ex[name]

        choice.change(pick, choice, [document, question], api_name=False)
        go.click(run, [document, question, methods, ratio, answer], [results, view, raw],
                 api_name="compress")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


def launch(host: str = "127.0.0.1", port: int | None = 7860, block: bool = True):
    """Build and start the app; returns (demo, local URL). block=False returns at once."""
    demo = build()
    _, url, _ = demo.launch(server_name=host, server_port=port, css=CSS,
                            prevent_thread_lock=not block, quiet=not block)
    return demo, url


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prompt compression app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    launch(args.host, args.port)


if __name__ == "__main__":
    main()
