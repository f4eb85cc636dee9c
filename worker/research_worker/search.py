"""Search backends (``documents`` with BM25, ``tavily``, ``wikipedia``) and the formatting of what
they find into a delimited, numbered context that the model is told to treat as data."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rank_bm25 import BM25Okapi

from research_api.documents import (
    DOC_SUFFIXES,
    MAX_PASSAGE_CHARS,
    OVERVIEW_TOTAL_CHARS,
    Passage,
    overview_chars,
    overview_shown,
    overview_text,
    split_markdown,
)
from research_api.task import DocumentsSource, TavilySource, WikipediaSource
from research_worker.errors import SearchError, WorkerConfigError
from research_worker.state import SearchDoc

log = logging.getLogger(__name__)

_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its of on or that the their this to "
    "was what when where which who why will with you your about into than then there these those".split()
)
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    out = []
    for w in _WORD.findall(text.lower()):
        if w in _STOPWORDS:
            continue
        if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


def read_folder(path: str | Path) -> dict[str, str]:
    """The text/Markdown files under a folder, by path relative to it."""
    root = Path(path)
    if not root.is_dir():
        raise WorkerConfigError(f"documents folder {root} does not exist")
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
    }


class SearchBackend(Protocol):
    name: str

    async def search(self, query: str) -> list[SearchDoc]: ...


class DocumentsBackend:
    """BM25 (rank-bm25, Okapi) over the passages of a set of text/Markdown documents."""

    name = "documents"

    def __init__(self, documents: Mapping[str, str], top_k: int = 3) -> None:
        self.documents = dict(sorted(documents.items()))
        self.passages = [p for src, text in sorted(documents.items()) for p in split_markdown(src, text)]
        self.top_k = top_k
        corpus = [tokenize(f"{p.title} {p.source} {p.content}") for p in self.passages]
        self._bm25 = BM25Okapi(corpus) if corpus and any(corpus) else None

    @classmethod
    def from_folder(cls, path: str | Path, top_k: int = 3) -> DocumentsBackend:
        return cls(read_folder(path), top_k)

    def rank(self, query: str) -> list[tuple[float, Passage]]:
        terms = tokenize(query)
        if self._bm25 is None or not terms:
            return []
        scores = self._bm25.get_scores(terms)
        ranked = sorted(zip(scores, range(len(scores)), strict=True), key=lambda t: (-t[0], t[1]))
        return [(float(s), self.passages[i]) for s, i in ranked[: self.top_k] if s > 0]

    async def search(self, query: str) -> list[SearchDoc]:
        return [
            SearchDoc(source=p.source, title=p.title, content=p.content, backend=self.name) for _, p in self.rank(query)
        ]

    def best_passage(self, source: str, *queries: str) -> SearchDoc | None:
        """The passage of ``source`` that best matches the first of ``queries`` any of its passages
        matches (BM25), else its first passage: how an analyst's assigned document is reached."""
        if self._bm25 is None:
            return None
        mine = [i for i, p in enumerate(self.passages) if p.source == source]
        if not mine:
            return None
        best = mine[0]
        for query in queries:
            terms = tokenize(query)
            if not terms:
                continue
            scores = self._bm25.get_scores(terms)
            top = max(mine, key=lambda i: (scores[i], -i))
            if scores[top] > 0:
                best = top
                break
        p = self.passages[best]
        return SearchDoc(source=p.source, title=p.title, content=p.content, backend=self.name)

    @property
    def empty(self) -> bool:
        """Nothing to search: the source holds no documents (or no text in them)."""
        return self._bm25 is None

    def overview(self, query: str, limit: int, total_chars: int = OVERVIEW_TOTAL_CHARS) -> list[SearchDoc]:
        """What the documents are about, for planning: up to ``limit`` documents, those most relevant to
        ``query`` first (BM25 over their passages), each as the start of its text. Together they take at
        most ``total_chars``: more documents, shorter starts (OVERVIEW_MIN_CHARS to OVERVIEW_CHARS)."""
        if self._bm25 is None:
            return []
        terms = tokenize(query)
        scores = self._bm25.get_scores(terms) if terms else [0.0] * len(self.passages)
        best: dict[str, float] = {}
        for score, p in zip(scores, self.passages, strict=True):
            best[p.source] = max(best.get(p.source, 0.0), float(score))
        order = sorted(best, key=lambda src: -best[src])  # stable: ties keep the documents' order
        shown = order[: overview_shown(limit, total_chars)]
        chars = overview_chars(len(shown), total_chars)
        return [
            SearchDoc(
                source=src,
                title="",
                content=overview_text(src, self.passages, self.documents.get(src, ""))[:chars],
                backend=self.name,
            )
            for src in shown
        ]


class TavilyBackend:
    name = "tavily"

    def __init__(self, settings: TavilySource, client: Any = None) -> None:
        self.settings = settings
        if client is None:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise WorkerConfigError(f"the Tavily API key variable {settings.api_key_env} is not set")
            from tavily import TavilyClient

            client = TavilyClient(api_key=key)
        self.client = client

    async def search(self, query: str) -> list[SearchDoc]:
        try:
            resp = await asyncio.to_thread(self.client.search, query, max_results=self.settings.max_results)
        except Exception as exc:  # the client raises requests' and its own errors
            raise SearchError(f"tavily search failed ({type(exc).__name__}): {exc}") from None
        return format_tavily(resp)


def format_tavily(resp: Mapping[str, Any]) -> list[SearchDoc]:
    docs = []
    for r in resp.get("results", []) or []:
        url, content = r.get("url"), (r.get("content") or "").strip()
        if url and content:
            docs.append(SearchDoc(source=str(url), title=str(r.get("title") or ""), content=content, backend="tavily"))
    return docs


class WikipediaBackend:
    name = "wikipedia"

    def __init__(self, settings: WikipediaSource, module: Any = None) -> None:
        self.settings = settings
        if module is None:
            import wikipedia

            module = wikipedia
        self.wiki = module

    def _search_sync(self, query: str) -> list[SearchDoc]:
        self.wiki.set_lang(self.settings.lang)
        titles = self.wiki.search(query, results=self.settings.max_docs)
        docs = []
        for title in titles[: self.settings.max_docs]:
            try:
                page = self.wiki.page(title, auto_suggest=False)
            except (self.wiki.exceptions.DisambiguationError, self.wiki.exceptions.PageError):
                continue
            text = (page.summary or page.content or "").strip()
            if text:
                docs.append(
                    SearchDoc(source=page.url, title=page.title, content=text[:MAX_PASSAGE_CHARS], backend="wikipedia")
                )
        return docs

    async def search(self, query: str) -> list[SearchDoc]:
        try:
            return await asyncio.to_thread(self._search_sync, query)
        except Exception as exc:  # requests' connection errors, wikipedia's own
            raise SearchError(f"wikipedia search failed ({type(exc).__name__}): {exc}") from None


def build_backends(
    sources: Sequence[DocumentsSource | TavilySource | WikipediaSource],
    load_configmap: Callable[[str], Mapping[str, str]] | None = None,
) -> list[SearchBackend]:
    """The backends a task selects; several ``documents`` sources are merged into one index."""
    backends: list[SearchBackend] = []
    docs: dict[str, str] = {}
    top_k = 0
    for s in sources:
        if isinstance(s, DocumentsSource):
            top_k = max(top_k, s.top_k)
            if s.path is not None:
                docs.update(read_folder(s.path))
            else:
                if load_configmap is None or s.config_map is None:
                    raise WorkerConfigError("a configMap documents source needs a cluster connection")
                docs.update({k: v for k, v in load_configmap(s.config_map).items() if k.endswith(DOC_SUFFIXES)})
        elif isinstance(s, TavilySource):
            backends.append(TavilyBackend(s))
        else:
            backends.append(WikipediaBackend(s))
    if top_k:
        if not docs:
            log.warning("%s: interviews are skipped unless another source can be searched", NO_DOCUMENTS)
        backends.insert(0, DocumentsBackend(docs, top_k))
    return backends


NO_DOCUMENTS = "the documents source holds no .md, .markdown or .txt documents"


def searchable(backends: Sequence[SearchBackend]) -> bool:
    """Whether any backend can find anything (a documents source without documents cannot)."""
    return any(not getattr(b, "empty", False) for b in backends)


def _escape(text: str) -> str:
    # Search content must not be able to close or open our delimiters.
    return re.sub(r"<(/?)\s*(context|document)", r"&lt;\1\2", text, flags=re.IGNORECASE)


def number_sources(docs: Sequence[SearchDoc]) -> list[str]:
    """The distinct sources in order of first retrieval: citation [n] names ``sources[n-1]``."""
    out: list[str] = []
    for d in docs:
        if d.source not in out:
            out.append(d.source)
    return out


def format_context(docs: Sequence[SearchDoc]) -> str:
    """Numbered, delimited documents: one ``<Document n=...>`` per source, its passages inside."""
    if not docs:
        return "<context>\n</context>"
    parts = ["<context>"]
    for n, source in enumerate(number_sources(docs), start=1):
        parts.append(f'<Document n="{n}" source="{_escape(source)}"/>')
        for d in docs:
            if d.source == source:
                head = f"{_escape(d.title)}\n" if d.title else ""
                parts.append(f"{head}{_escape(d.content)}")
        parts.append("</Document>")
    parts.append("</context>")
    return "\n".join(parts)
