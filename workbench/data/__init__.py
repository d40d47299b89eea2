"""Loaders for the real data the environment ships inside registry packages (see data.md).

    from workbench.data import load_bfcl, load_nestful, load_sharegpt, text_chunks

Each loader reads an installed package's files without importing the package, returns typed
records (dataclasses), and raises a WorkbenchError with the exact pip command when the package
is missing. Only `text_chunks` needs torch, and it imports it when called.
"""

from workbench.data.bfcl import BFCLEntry, bfcl_categories, load_bfcl
from workbench.data.nestful import (
    NestfulCall,
    NestfulSample,
    Reference,
    load_nestful,
    nestful_catalog,
    references,
)
from workbench.data.sharegpt import Conversation, Turn, load_sharegpt
from workbench.data.text import (
    Document,
    long_documents,
    python_docs_text,
    python_docs_topics,
    text_chunks,
)

__all__ = [
    "BFCLEntry", "bfcl_categories", "load_bfcl",
    "NestfulCall", "NestfulSample", "Reference", "load_nestful", "nestful_catalog", "references",
    "Conversation", "Turn", "load_sharegpt",
    "Document", "long_documents", "python_docs_text", "python_docs_topics", "text_chunks",
]
