"""The reconcile decision: given a ResearchJob, its child Jobs and what the store holds, what
should exist and what is the status. A pure function; the handlers gather the world and apply
the decision. Status is rebuilt from the world on every pass, never trusted from a prior write.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from research_api.records import ReportQuality
from research_api.researchjob import (
    AnalystStatus,
    BatchCounts,
    BudgetSpec,
    Condition,
    EstimateStatus,
    Phase,
    QualityStatus,
    ReportRef,
    ResearchJobSpec,
    ResearchJobStatus,
    StepUsage,
)
from research_api.task import QualityFloor
from research_operator.constants import plan_id
from research_operator.decisions.admission import PodResources, WaitReason
from research_operator.decisions.ledger import Prices, money
from research_operator.decisions.tenancy import Refusal

# How soon a ResearchJob refused because the author-checking policy is missing looks again: its
# installation sends no watch event the operator receives.
POLICY_RECHECK = dt.timedelta(seconds=30)
# How soon a ResearchJob whose estimate could not be computed (its documents ConfigMap not there yet)
# looks again: the operator does not watch the users' ConfigMaps.
ESTIMATE_RECHECK = dt.timedelta(seconds=30)


class CeilingReason(StrEnum):
    """Why a ResearchJob is held before it starts (condition EstimateAboveCeiling, status.waitingFor)."""

    EXCEEDS = "EstimateExceedsCeiling"  # its estimate is above spec.budget.maxEstimatedTokens or maxEstimatedCost
    UNKNOWN = "EstimateUnknown"  # a ceiling is set and the estimate (or its cost) cannot be computed


@dataclass(frozen=True)
class Estimated:
    """The estimate of a ResearchJob that has not started (research_api.estimate), or why there is none."""

    figures: EstimateStatus | None
    problem: str = ""  # why there are no figures, e.g. its documents ConfigMap does not exist
    endpoint: str = ""  # the ModelEndpoint whose prices the cost is at ("": none)


@dataclass(frozen=True)
class Held:
    reason: CeilingReason
    message: str


def over_ceiling(budget: BudgetSpec, est: Estimated) -> Held | None:
    """Whether a ResearchJob with ``budget`` may not start, given its estimate: above a ceiling, or a
    ceiling it cannot be compared with."""
    tokens, cost = budget.max_estimated_tokens, budget.max_estimated_cost
    if tokens is None and cost is None:
        return None
    fig = est.figures
    if fig is None:
        return Held(
            CeilingReason.UNKNOWN, f"cannot estimate the job, so it does not start under its ceiling: {est.problem}"
        )
    what = f"{fig.tokens} tokens in {fig.calls} model calls"
    advice = "raise the ceiling or make the job smaller (analysts.count, interview.maxTurns, sources' maxResults)"
    if tokens is not None and fig.tokens > tokens:
        return Held(
            CeilingReason.EXCEEDS,
            f"estimated {what}, above spec.budget.maxEstimatedTokens {tokens}; not started: {advice}",
        )
    if cost is not None:
        if fig.cost is None:
            where = f"ModelEndpoint {est.endpoint} has no prices" if est.endpoint else "job calls no ModelEndpoint"
            return Held(
                CeilingReason.UNKNOWN,
                f"the cost cannot be estimated: the {where} (spec.prices), which spec.budget.maxEstimatedCost needs; "
                "not started",
            )
        if Decimal(fig.cost) > Decimal(cost):
            return Held(
                CeilingReason.EXCEEDS,
                f"estimated cost {fig.cost} ({what}), above spec.budget.maxEstimatedCost {cost}; not started: {advice}",
            )
    return None


def has_started(prev: ResearchJobStatus, jobs: int, stored_plans: int) -> bool:
    """Whether a ResearchJob has begun (it left Pending, has Jobs or stored analysts): from then on its
    estimate is the one made before it started, and its ceilings no longer apply."""
    return prev.phase != Phase.Pending or jobs > 0 or stored_plans > 0


@dataclass(frozen=True)
class JobView:
    """What the operator needs of one child batch/v1 Job."""

    name: str
    step: str  # plan | interview | write | cleanup
    plan: str
    batch: int | None = None
    uid: str = ""  # empty while only this process knows it (created, not yet seen by the watch)
    pods: int = 0  # status.active: pods created and not finished
    pod: PodResources = PodResources()  # what its pod requests
    succeeded: bool = False
    failed: bool = False
    suspended: bool = False
    message: str = ""
    finished: dt.datetime | None = None  # when it completed or failed
    endpoint: str = ""  # the ModelEndpoint it was admitted against
    concurrency: int = 0  # requests in flight its pod may need there
    admitted: str = ""  # when it was admitted there (sortable)

    @property
    def active(self) -> bool:
        return not (self.succeeded or self.failed or self.suspended)

    @property
    def unfinished(self) -> bool:
        """Running or suspended (waiting for Kueue): it holds a slot under the caps and may still run."""
        return not (self.succeeded or self.failed)


@dataclass(frozen=True)
class StoreView:
    """What the store holds for one ResearchJob, by plan id."""

    analysts: dict[str, list[AnalystStatus]] = field(default_factory=dict)
    sections: dict[str, frozenset[int]] = field(default_factory=dict)
    reports: dict[str, ReportRef] = field(default_factory=dict)
    qualities: dict[str, ReportQuality] = field(default_factory=dict)  # the reports' quality figures
    tokens: int = 0
    input_tokens: int = 0  # of ``tokens``, in prompts (cost follows the endpoint's prices)
    output_tokens: int = 0
    steps: dict[str, list[StepTokens]] = field(default_factory=dict)  # by plan id: each stored step's usage


@dataclass(frozen=True)
class StepTokens:
    """What one stored step used: plan (analysts), interview (a section, by analyst) or write (the report)."""

    step: str
    analyst: int | None
    input_tokens: int
    output_tokens: int
    tokens: int


@dataclass(frozen=True)
class Observed:
    generation: int
    created: dt.datetime
    now: dt.datetime
    jobs: list[JobView]
    store: StoreView
    previous: ResearchJobStatus
    uid: str = ""  # the ResearchJob's uid (part of its plan ids)
    refusal: Refusal | None = None  # why no worker Job may be created for it (tenancy)
    prices: Prices | None = None  # its ModelEndpoint's prices (None: none declared)
    quality_floor: QualityFloor = QualityFloor()  # the admins' default (settings.quality)
    # its estimate while it has not started; None once it has (the status keeps the one made before)
    estimate: Estimated | None = None
    traceparent: str | None = None  # its trace (actions/tracing); None: tracing is off


@dataclass
class Decision:
    status: ResearchJobStatus
    create_plan: bool = False
    waiting_batches: list[int] = field(default_factory=list)
    create_writer: bool = False
    delete_jobs: list[str] = field(default_factory=list)
    delete_self: bool = False
    wake_at: dt.datetime | None = None  # a deadline or TTL that needs a pass then, with no watch event
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    # Events posted whatever the phase (``events`` are posted when the phase changes)
    notices: list[tuple[str, str, str]] = field(default_factory=list)


def batches(count: int, batch_size: int) -> list[list[int]]:
    """Analyst indices of each batch, in order."""
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def continues_steps(spec: ResearchJobSpec, budgeted: bool) -> bool:
    """Whether worker pods go on to the next step in their own process (``ResearchTask.continue_steps``):
    not for a planner whose analysts a person must first approve, and not in a namespace with a
    token budget (``budgeted``), where every step is a Job of its own so that a spent budget stops
    the next one (admission checks the budget, a running pod does not)."""
    return not budgeted and (not spec.analysts.review or spec.analysts.approved)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    prev: ResearchJobStatus, ctype: str, status: bool, reason: str, message: str, generation: int, now: dt.datetime
) -> Condition:
    """A condition that keeps its lastTransitionTime while its status does not change."""
    s = "True" if status else "False"
    old = next((c for c in prev.conditions or [] if c.type == ctype), None)
    when = old.last_transition_time if old is not None and old.status == s else rfc3339(now)
    return Condition(
        type=ctype, status=s, reason=reason, message=message, last_transition_time=when, observed_generation=generation
    )


STEP_ORDER = {"plan": 0, "interview": 1, "write": 2}


def step_usage(steps: list[StepTokens], prices: Prices | None) -> list[StepUsage] | None:
    """Each stored step's tokens and cost (at ``prices``), in the order they run."""
    if not steps:
        return None
    return [
        StepUsage(
            step=s.step,
            analyst=s.analyst,
            tokens=s.tokens,
            cost=money(prices.amount(s.input_tokens, s.output_tokens).cost) if prices else None,
        )
        for s in sorted(steps, key=lambda s: (STEP_ORDER.get(s.step, 3), s.analyst or 0))
    ]


def quality_status(q: ReportQuality) -> QualityStatus:
    """The status form of a report's quality figures."""
    r, s = q.report, q.sections
    return QualityStatus(
        sentences_checked=r.checked,
        sentences_supported=r.supported,
        sentences_recited=r.recited,
        sentences_dropped=r.dropped,
        citation_accuracy=q.accuracy_percent,
        section_sentences_checked=s.checked,
        section_sentences_supported=s.supported,
        section_sentences_recited=s.recited,
        section_sentences_dropped=s.dropped,
        sources_retrieved=q.sources_retrieved,
        sources_cited=q.sources_cited,
        relevant_documents=len(q.relevant),
        relevant_cited=q.relevant_cited,
        coverage=q.coverage_percent,
        unreached_documents=q.unreached or None,
        uncited_documents=q.uncited or None,
        rewrites=q.total.revised,
        failures=(r.failures + s.failures)[:5] or None,
    )


def grounded(q: ReportQuality, missed: list[str]) -> tuple[bool, str, str]:
    """The Grounded condition: (status, reason, message). True when every cited sentence of the report
    was supported by the passage it cites as its writer wrote it."""
    if missed:
        return False, "BelowQualityFloor", "; ".join(missed)
    if q.cites_nothing:
        return False, "NoCitations", f"the report cites none of the {q.sources_retrieved} sources retrieved"
    if q.report.supported < q.report.checked:
        return False, "UnsupportedCitations", q.figures()
    return True, "CitationsSupported", q.figures()


def decide(spec: ResearchJobSpec, obs: Observed) -> Decision:
    pid = plan_id(spec.analysts.feedback, obs.uid)
    prev = obs.previous
    now = obs.now
    gen = obs.generation
    jobs = [j for j in obs.jobs if j.plan == pid]
    stale = [j.name for j in obs.jobs if j.plan != pid]  # Jobs of a superseded plan
    plan_job = next((j for j in jobs if j.step == "plan"), None)
    writer = next((j for j in jobs if j.step == "write"), None)
    by_batch = {j.batch: j for j in jobs if j.step == "interview"}
    # A planner that goes on to interview a batch: that batch's Job while it runs or if it failed
    # (its retries covered the interviews too); if it ended well without them, the batch gets its own.
    carrier = plan_job if plan_job is not None and plan_job.batch is not None else None
    analysts = obs.store.analysts.get(pid)
    done = obs.store.sections.get(pid, frozenset())
    report = obs.store.reports.get(pid)
    quality = obs.store.qualities.get(pid)
    floor = QualityFloor(
        min_citation_accuracy=spec.quality.min_citation_accuracy, min_coverage=spec.quality.min_coverage
    ).over(obs.quality_floor)
    missed = quality.misses(floor) if quality is not None and report is not None else []
    count = spec.analysts.count

    st = ResearchJobStatus(
        observed_generation=gen,
        plan_id=pid,
        analysts=analysts,
        sections_done=len(done),
        progress=f"{len(done)}/{count}",
        tokens_used=obs.store.tokens,
        cost=money(obs.prices.amount(obs.store.input_tokens, obs.store.output_tokens).cost) if obs.prices else None,
        usage=step_usage(obs.store.steps.get(pid, []), obs.prices),
        start_time=prev.start_time or rfc3339(obs.created),
        traceparent=obs.traceparent,
    )
    d = Decision(status=st, delete_jobs=list(stale))
    plan = batches(count, spec.parallelism.batch_size)
    carried = plan[n] if carrier is not None and (n := carrier.batch) is not None and n < len(plan) else []
    counts = BatchCounts(total=len(plan))
    failure: tuple[str, str] | None = None

    if report is not None:
        st.phase = Phase.Succeeded
        st.report = report
        counts.succeeded = len(plan)
        st.message = f"report ready: {report.title or report.config_map or report.postgres_id}"
        if report.postgres_id is not None:
            st.message += (
                f" (in PostgreSQL as {report.postgres_id}; print it with "
                f"`research-worker show-report --postgres-id {report.postgres_id}` and the DSN in $RESEARCH_PG_DSN)"
            )
        d.delete_jobs += [j.name for j in jobs if not j.active]  # the writer's work is stored
        if quality is not None:
            st.quality = quality_status(quality)
        if missed:  # the report stays named in status, for a look at what fell short
            failure = ("BelowQualityFloor", "the report misses the quality floor: " + "; ".join(missed))
    elif analysts is None:
        st.phase = Phase.Planning
        if plan_job is None:
            d.create_plan = True
            st.message = "planning the analyst panel"
        elif plan_job.failed:
            failure = ("PlanFailed", f"the planner Job {plan_job.name} failed: {plan_job.message}".strip())
        else:
            st.message = f"planner Job {plan_job.name} running"
    elif spec.analysts.review and not spec.analysts.approved:
        st.phase = Phase.AwaitingReview
        st.message = "analysts planned; approve with spec.analysts.approved=true or give spec.analysts.feedback"
    else:
        names = {i: a.name for i, a in enumerate(analysts)}
        failed_analysts: list[str] = []
        failure_messages: list[str] = []
        active: list[str] = []
        for b, members in enumerate(plan):
            job = by_batch.get(b)
            if job is None and carrier is not None and carrier.batch == b and not carrier.succeeded:
                job = carrier
            if all(i in done for i in members):
                counts.succeeded += 1
                if job is not None and not job.active:
                    d.delete_jobs.append(job.name)  # results are stored; free the quota it holds
            elif job is None:
                d.waiting_batches.append(b)
            elif job.failed:
                counts.failed += 1
                failed_analysts += [names.get(i, str(i)) for i in members if i not in done]
                failure_messages.append(job.message)
            elif job.suspended:
                counts.queued += 1
            elif job.succeeded:
                counts.failed += 1  # finished without storing every section
                failed_analysts += [names.get(i, str(i)) for i in members if i not in done]
            else:
                counts.active += 1
                active.append(job.name)
        counts.queued += len(d.waiting_batches)
        st.active_jobs = active or None
        if plan_job is not None and not plan_job.active and plan_job.name not in d.delete_jobs:
            if plan_job.succeeded or all(i in done for i in carried):
                d.delete_jobs.append(plan_job.name)  # a failed carrier stays: it is its batch's failure
        if failed_analysts:
            st.failed_analysts = failed_analysts
            why = next((m for m in failure_messages if m), "")
            failure = (
                "BatchFailed",
                f"interviews failed beyond retries for: {', '.join(failed_analysts)}" + (f" ({why})" if why else ""),
            )
        elif counts.succeeded == len(plan):
            st.phase = Phase.Writing
            # The pod that stored the last section writes the report itself (``continue_steps``): the
            # writer Job is only for when none of them did, once they have all ended.
            running = [j.name for j in jobs if j.step != "write" and j.active]
            if writer is None and running:
                st.message = (
                    f"all sections written; the report is written by the pod that stored the last one "
                    f"(waiting for {', '.join(running)} to end)"
                )
            elif writer is None:
                d.create_writer = True
                st.message = "all sections written; writing the report"
            elif writer.failed:
                failure = ("WriteFailed", f"the writer Job {writer.name} failed: {writer.message}".strip())
            else:
                st.message = f"writer Job {writer.name} running"
        else:
            st.phase = Phase.Interviewing
            st.message = interviewing_message(len(done), count, counts.active, counts.queued)

    # Budget and deadline: both only grow, so a job that crossed them stays Failed.
    if failure is None and st.phase != Phase.Succeeded:
        if spec.budget.max_tokens is not None and obs.store.tokens > spec.budget.max_tokens:
            failure = ("BudgetExceeded", f"used {obs.store.tokens} tokens of the {spec.budget.max_tokens} allowed")
        elif spec.budget.deadline_seconds is not None:
            deadline = obs.created + dt.timedelta(seconds=spec.budget.deadline_seconds)
            if now > deadline:
                failure = ("DeadlineExceeded", f"not finished within {spec.budget.deadline_seconds}s")
            else:
                d.wake_at = deadline + dt.timedelta(seconds=1)

    if failure is not None:
        reason, message = failure
        st.phase = Phase.Failed
        st.message = message
        d.waiting_batches.clear()
        d.create_plan = d.create_writer = False
        # Suspended Jobs too: in Kueue mode they would otherwise be admitted and run later.
        d.delete_jobs += [j.name for j in jobs if j.unfinished and j.name not in d.delete_jobs]
        counts.queued = 0
    st.batches = counts

    # The estimate ceiling: a job that has not started waits in Pending while its estimate is above it.
    st.estimate = obs.estimate.figures if obs.estimate is not None else prev.estimate
    held = over_ceiling(spec.budget, obs.estimate) if obs.estimate is not None and failure is None else None
    if held is not None:
        d.create_plan = d.create_writer = False
        d.waiting_batches.clear()
        st.phase = Phase.Pending
        st.message = held.message
        st.waiting_for = held.reason.value
        if held.reason == CeilingReason.UNKNOWN:
            d.wake_at = now + ESTIMATE_RECHECK if d.wake_at is None else min(d.wake_at, now + ESTIMATE_RECHECK)

    terminal = st.phase in (Phase.Succeeded, Phase.Failed)
    refused = obs.refusal if not terminal else None
    if refused is not None:
        # Nothing new starts; Jobs already running go on (they were created while it was allowed).
        d.create_plan = d.create_writer = False
        d.waiting_batches.clear()
        if st.phase == Phase.Planning and plan_job is None:
            st.phase = Phase.Pending
        st.message = refused.message
        st.waiting_for = "PolicyViolation"
        if refused.recheck:
            again = now + POLICY_RECHECK
            d.wake_at = again if d.wake_at is None else min(d.wake_at, again)
    if terminal:
        st.completion_time = prev.completion_time if prev.phase == st.phase and prev.completion_time else rfc3339(now)
        if spec.ttl_seconds_after_finished is not None:
            finished = dt.datetime.fromisoformat(st.completion_time.replace("Z", "+00:00"))
            expires = finished + dt.timedelta(seconds=spec.ttl_seconds_after_finished)
            d.delete_self = now >= expires
            d.wake_at = None if d.delete_self else expires
        else:
            d.wake_at = None

    def while_in(ctype: str, phase: Phase, reason: str, otherwise: str) -> Condition:
        """A condition that is True, with the status message, exactly while the job is in ``phase``."""
        on = st.phase == phase
        return condition(prev, ctype, on, reason if on else otherwise, (st.message or "") if on else "", gen, now)

    st.conditions = [
        condition(prev, "Planned", analysts is not None, "AnalystsStored" if analysts else "Planning", "", gen, now),
        while_in("AwaitingReview", Phase.AwaitingReview, "ReviewRequested", "NotWaiting"),
        while_in("Complete", Phase.Succeeded, "ReportWritten", "InProgress"),
        *(
            [condition(prev, "Grounded", *grounded(quality, missed), gen, now)]
            if quality is not None and report is not None
            else []
        ),
        condition(
            prev,
            "PolicyViolation",
            refused is not None,
            refused.reason.value if refused else "WithinPolicy",
            refused.message if refused else "",
            gen,
            now,
        ),
        condition(
            prev,
            "EstimateAboveCeiling",
            held is not None,
            held.reason.value if held else "WithinCeiling",
            held.message if held else "",
            gen,
            now,
        ),
        condition(
            prev,
            "Failed",
            failure is not None,
            failure[0] if failure else "NoFailure",
            failure[1] if failure else "",
            gen,
            now,
        ),
    ]
    if prev.phase != st.phase:
        kind = "Warning" if st.phase == Phase.Failed else "Normal"
        d.events.append((kind, st.phase.value if failure is None else failure[0], st.message or st.phase.value))
    was = next((c for c in prev.conditions or [] if c.type == "EstimateAboveCeiling"), None)
    if held is not None and (was is None or was.status != "True" or was.message != held.message):
        d.notices.append(("Warning", held.reason.value, held.message))
    before = next((c for c in prev.conditions or [] if c.type == "PolicyViolation"), None)
    if refused is not None and (before is None or before.status != "True" or before.message != refused.message):
        d.notices.append(("Warning", "PolicyViolation", refused.message))
    return d


# ------------------------------------------------------------------------------------------
# waiting: what admission, the API server or the Job controller held back, as status
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """What holds back a ResearchJob's worker Jobs after a pass: admission's reason for the ones it
    did not start (caps, fair share, a quota, a 403 from the API server), and a created Job whose pod
    the Job controller cannot create (its FailedCreate Event)."""

    what: str = ""  # "the planner Job", "3 interview batches", ...
    reason: WaitReason | None = None
    message: str = ""
    pods_blocked: str | None = None
    refused: bool = False  # a 403 from the API server that the computed headroom did not foresee
    until: dt.datetime | None = None  # when the wait ends by itself (a token budget's period rolls over)
    namespace_terminating: bool = False  # a create was refused: the namespace is being deleted


# What decide() holds a ResearchJob for, which admission's waiting does not overwrite.
DECIDED_WAITS = frozenset({"PolicyViolation", *(r.value for r in CeilingReason)})


def interviewing_message(done: int, count: int, active: int, queued: int) -> str:
    return f"{done}/{count} sections; {active} batch Jobs running, {queued} waiting"


def step_noun(step: str, count: int) -> str:
    if step == "interview":
        return f"{count} interview batch{'es' if count != 1 else ''}"
    return {"plan": "the planner Job", "write": "the writer Job", "cleanup": "the cleanup Job"}.get(step, step)
