"""What ``watch`` shows of a ResearchJob, from its status alone (pure functions).

A :class:`Snapshot` is read from the object; ``line`` is the one-line form printed for each change
when stdout is not a terminal, ``panel`` the block redrawn in place on a terminal. ``change_key``
leaves out the elapsed time, so a pipe gets a line only when something the job did changed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from research_api.researchjob import TERMINAL_PHASES, Phase

# Conditions that, while True, say why the job waits: the operator's own words for it.
WAIT_CONDITIONS = frozenset(
    {
        "QuotaExceeded",
        "Throttled",
        "WorkerPodsBlocked",
        "AwaitingReview",
        "WaitingForEndpoint",
        "TokenBudgetExhausted",
        "EstimateAboveCeiling",
    }
)
WAIT_PREFIXES = ("Waiting",)
WAIT_SUFFIXES = ("Exceeded", "Blocked", "Queued", "Pending")


def is_wait_condition(ctype: str) -> bool:
    return ctype in WAIT_CONDITIONS or ctype.startswith(WAIT_PREFIXES) or ctype.endswith(WAIT_SUFFIXES)


def parse_time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def waiting_for(obj: dict[str, Any], caps_note: str | None = None) -> str | None:
    """Why this ResearchJob waits, or None when nothing of it waits.

    A True waiting condition (QuotaExceeded, AwaitingReview, Waiting*, *Exceeded, ...) says it in
    the operator's own words. Batches queued without such a condition wait for a running
    slot: the job's own ``maxActiveJobs`` when it has that many running, else the admins' caps
    (``caps_note``, when the caller knows them) or the fair share of them."""
    status = obj.get("status") or {}
    phase = status.get("phase") or Phase.Pending.value
    if phase in TERMINAL_PHASES:
        return None
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and is_wait_condition(str(c.get("type") or "")):
            return f"{c.get('type')}: {c.get('message') or c.get('reason') or ''}".rstrip(": ")
    batches = status.get("batches") or {}
    queued = int(batches.get("queued") or 0)
    if queued <= 0:
        return "the operator (not reconciled yet)" if phase == Phase.Pending.value and not status else None
    active = int(batches.get("active") or 0)
    max_active = int(((obj.get("spec") or {}).get("parallelism") or {}).get("maxActiveJobs") or 2)
    if active >= max_active:
        return f"a running slot: its own maxActiveJobs ({max_active}) are running"
    return (
        caps_note
        or "a running slot (the admins' caps, the fair share or the operator's next pass: kubectl research top)"
    )


@dataclass(frozen=True)
class Snapshot:
    phase: str
    sections_done: int
    sections_total: int
    running: int
    queued: int
    batches_total: int
    tokens: int
    max_tokens: int | None
    elapsed: float  # seconds since start (to completion, once finished)
    message: str
    waiting: str | None
    cost: str | None = None  # status.cost, at the ModelEndpoint's prices
    max_cost: str | None = None  # spec.budget.maxCost
    quality: str | None = None  # the report's quality figures, once there is a report

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def change_key(self) -> tuple[Any, ...]:
        """What a line shows, less the elapsed time: a pipe gets a line only when that changes."""
        return (body(self),)


def snapshot(obj: dict[str, Any], now: dt.datetime) -> Snapshot:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    meta = obj.get("metadata") or {}
    batches = status.get("batches") or {}
    start = parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp")) or now
    end = parse_time(status.get("completionTime")) or now
    return Snapshot(
        phase=str(status.get("phase") or Phase.Pending.value),
        sections_done=int(status.get("sectionsDone") or 0),
        sections_total=int((spec.get("analysts") or {}).get("count") or 3),
        running=int(batches.get("active") or 0),
        queued=int(batches.get("queued") or 0),
        batches_total=int(batches.get("total") or 0),
        tokens=int(status.get("tokensUsed") or 0),
        max_tokens=(spec.get("budget") or {}).get("maxTokens"),
        elapsed=max(0.0, (end - start).total_seconds()),
        message=str(status.get("message") or ""),
        waiting=waiting_for(obj),
        cost=status.get("cost"),
        max_cost=(spec.get("budget") or {}).get("maxCost"),
        quality=quality(status.get("quality")),
    )


def quality(q: Any) -> str | None:
    """status.quality in a line: "cited 61/61 supported (100%), coverage 6/6 (100%), sources 6 of 6 retrieved"."""
    if not isinstance(q, dict):
        return None
    line = (
        f"cited {q.get('sentencesSupported', 0)}/{q.get('sentencesChecked', 0)} supported "
        f"({q.get('citationAccuracy', 100)}%)"
    )
    fixed = [
        f"{n} {what}"
        for what, n in (("re-cited", q.get("sentencesRecited")), ("dropped", q.get("sentencesDropped")))
        if n
    ]
    if fixed:
        line += f" [{', '.join(fixed)}]"
    if q.get("sectionSentencesChecked"):
        line += f" (sections {q.get('sectionSentencesSupported', 0)}/{q.get('sectionSentencesChecked')})"
    line += f", coverage {q.get('relevantCited', 0)}/{q.get('relevantDocuments', 0)} ({q.get('coverage', 100)}%)"
    line += f", sources {q.get('sourcesCited', 0)} cited of {q.get('sourcesRetrieved', 0)} retrieved"
    missed = list(q.get("unreachedDocuments") or []) + list(q.get("uncitedDocuments") or [])
    if missed:
        line += f"; not cited: {', '.join(missed)}"
    return line


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def tokens(s: Snapshot) -> str:
    if s.max_tokens:
        return f"{s.tokens}/{s.max_tokens} ({100 * s.tokens // int(s.max_tokens)}%)"
    return f"{s.tokens} (no budget)"


def cost(s: Snapshot) -> str | None:
    """What it cost (and of which budget), when its endpoint has prices or it has a money budget."""
    if s.cost is None and s.max_cost is None:
        return None
    return f"{s.cost or '0'}/{s.max_cost}" if s.max_cost else f"{s.cost} (no budget)"


def line(s: Snapshot) -> str:
    """One line per change (for pipes and logs)."""
    return f"{duration(s.elapsed):>7}  {body(s)}"


def body(s: Snapshot) -> str:
    parts = [
        f"{s.phase:<14}",
        f"sections {s.sections_done}/{s.sections_total}",
        f"batches running {s.running} queued {s.queued}",
        f"tokens {tokens(s)}",
        *([f"cost {c}"] if (c := cost(s)) else []),
    ]
    if s.quality:
        parts.append(f"quality {s.quality}")
    tail = f"waiting for {s.waiting}" if s.waiting and s.queued else s.message
    return "  ".join(parts) + (f"  {tail}" if tail else "")


def bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def panel(namespace: str, name: str, s: Snapshot) -> list[str]:
    """The block shown on a terminal, redrawn in place."""
    lines = [
        f"ResearchJob {namespace}/{name}",
        f"  phase     {s.phase}",
        f"  sections  {bar(s.sections_done, s.sections_total)} {s.sections_done}/{s.sections_total}",
        f"  batches   {s.running} running, {s.queued} queued" + (f" (of {s.batches_total})" if s.batches_total else ""),
        f"  tokens    {tokens(s)}",
        *([f"  cost      {c}"] if (c := cost(s)) else []),
        f"  elapsed   {duration(s.elapsed)}",
    ]
    if s.quality:
        lines.append(f"  quality   {s.quality}")
    if s.waiting:
        lines.append(f"  waiting   for {s.waiting}")
    if s.message:
        lines.append(f"  message   {s.message}")
    return lines
