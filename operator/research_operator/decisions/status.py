"""A ResearchJob's status, composed from the decisions: ``reconcile.decide`` builds it from the world
(phase, counts, steps, usage, quality), and a pass adds, here, what admission and Kueue answered
(``after_pass``); the two statuses a pass writes without deciding steps (an invalid spec, a deletion
under way) are built here too. The actions only write what these return: no status is built in
``actions/``."""

from __future__ import annotations

import datetime as dt

from research_api.researchjob import Phase, ResearchJobStatus
from research_operator.decisions import kueue
from research_operator.decisions.admission import WaitReason
from research_operator.decisions.reconcile import DECIDED_WAITS, Waiting, condition, interviewing_message

Event = tuple[str, str, str]  # type (Normal, Warning), reason, message


def after_pass(
    st: ResearchJobStatus,
    prev: ResearchJobStatus,
    waiting: Waiting,
    *,
    started: int | None,
    analysts: int,
    kueue_wait: kueue.KueueWait,
    kueue_mode: bool,
    generation: int,
    now: dt.datetime,
) -> list[Event]:
    """Complete ``st`` (from ``reconcile.decide``) with what the pass's admission answered: the
    interview batches it ``started`` (None: it created none), what still waits and why, and why
    Jobs wait for Kueue; the Events to post for conditions that turned True."""
    if started is not None:
        batches_started(st, analysts, started)
    events = apply_waiting(st, prev, waiting, generation, now)
    kueue.annotate(st, kueue_wait, prev, generation, now, kueue_mode=kueue_mode)
    return events


def invalid_spec(prev: ResearchJobStatus, message: str, generation: int, now: dt.datetime) -> ResearchJobStatus:
    """A spec the models refuse (the CRD's schema let it through): Failed, saying which fields."""
    st = prev.model_copy()
    st.phase = Phase.Failed
    st.message = f"invalid spec: {message}"
    st.conditions = [condition(prev, "Failed", True, "InvalidSpec", message, generation, now)]
    return st


def cleaning_up(
    prev: ResearchJobStatus, message: str | None, failure: str | None, generation: int, now: dt.datetime
) -> ResearchJobStatus | None:
    """A PostgreSQL-store ResearchJob being deleted: what its cleanup does (``message``) and condition
    CleanupFailed while its cleanup Job fails (``failure``); None when there is nothing to say."""
    failed_before = any(c.type == "CleanupFailed" and c.status == "True" for c in prev.conditions or [])
    if not (message or failure or failed_before):
        return None
    st = prev.model_copy()
    st.message = message or st.message
    reason = "CleanupJobFailed" if failure else "CleaningUp"
    cond = condition(prev, "CleanupFailed", failure is not None, reason, failure or "", generation, now)
    st.conditions = [*(c for c in prev.conditions or [] if c.type != "CleanupFailed"), cond]
    return st


def batches_started(st: ResearchJobStatus, count: int, started: int) -> None:
    """``started`` interview batch Jobs were created in this pass: the status counts them as running."""
    st.batches.active += started
    st.batches.queued -= started
    if started:
        st.message = interviewing_message(st.sections_done, count, st.batches.active, st.batches.queued)


def apply_waiting(
    st: ResearchJobStatus, prev: ResearchJobStatus, w: Waiting, generation: int, now: dt.datetime
) -> list[tuple[str, str, str]]:
    """Set the message, ``waitingFor`` and the QuotaExceeded, Throttled, WaitingForEndpoint,
    TokenBudgetExhausted and WorkerPodsBlocked conditions of ``st`` from ``w``; return the Events to
    post (one per condition that turns True or changes reason)."""
    quota = w.reason is not None and w.reason.is_quota
    throttled = w.reason is not None and w.reason.is_throttle
    endpoint = w.reason == WaitReason.ENDPOINT_CAPACITY
    budget = w.reason == WaitReason.TOKEN_BUDGET
    if w.reason == WaitReason.QUOTA_TOO_SMALL:
        st.message = f"cannot start {w.what}: {w.message}"
    elif quota:
        st.message = f"waiting for quota: {w.what}: {w.message}"
    elif budget:
        st.message = f"token budget spent: {w.what} waiting: {w.message}"
    elif endpoint:
        st.message = f"{st.message}; " if st.message and st.phase == Phase.Interviewing else ""
        st.message += f"{w.what} waiting for model endpoint capacity: {w.message}"
    elif throttled and w.reason != WaitReason.MAX_ACTIVE_JOBS:
        st.message = f"{st.message}; " if st.message and st.phase == Phase.Interviewing else ""
        st.message += f"{w.what} waiting for a slot: {w.message}"
    if w.pods_blocked:
        st.message = w.pods_blocked
    if w.reason is not None or st.waiting_for not in DECIDED_WAITS:  # decide() says why nothing starts
        st.waiting_for = w.reason.value if w.reason is not None and w.reason != WaitReason.MAX_ACTIVE_JOBS else None
    if w.pods_blocked and st.waiting_for is None:
        st.waiting_for = "FailedCreate"
    reason = w.reason.value if w.reason else ""
    conds = [
        condition(prev, ctype, on, on_reason if on else off_reason, message if on else "", generation, now)
        for ctype, on, on_reason, off_reason, message in (
            ("QuotaExceeded", quota, reason, "WithinQuota", w.message),
            ("Throttled", throttled, reason, "NotThrottled", w.message),
            ("WaitingForEndpoint", endpoint, reason, "EndpointCapacityAvailable", w.message),
            ("TokenBudgetExhausted", budget, reason, "WithinTokenBudget", w.message),
            ("WorkerPodsBlocked", w.pods_blocked is not None, "FailedCreate", "PodsCreated", w.pods_blocked or ""),
        )
    ]
    events: list[tuple[str, str, str]] = []
    before = {c.type: c for c in prev.conditions or []}
    for c in conds:
        old = before.get(c.type)
        if c.status != "True" or (old is not None and old.status == "True" and old.reason == c.reason):
            continue
        if c.type == "QuotaExceeded":
            reason = "QuotaTooSmall" if w.reason == WaitReason.QUOTA_TOO_SMALL else "QuotaExceeded"
            events.append(("Warning", reason, st.message or c.message))
        elif c.type == "WorkerPodsBlocked":
            events.append(("Warning", "FailedCreate", c.message))
        elif c.type == "TokenBudgetExhausted":
            events.append(("Warning", "TokenBudgetExhausted", c.message))
        elif c.type == "WaitingForEndpoint":
            what = f"{w.what} waiting for model endpoint capacity"
            events.append(("Normal", "WaitingForEndpoint", f"{what}: {c.message}"))
        elif c.reason != WaitReason.MAX_ACTIVE_JOBS:
            events.append(("Normal", "Throttled", f"{w.what} waiting for a slot: {c.message}"))
    st.conditions = [*(x for x in st.conditions or [] if x.type not in {c.type for c in conds}), *conds]
    return events
