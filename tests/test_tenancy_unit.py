"""Tenancy decisions without a cluster: what the operator refuses to hand to worker pods, and the
status a refused ResearchJob shows. The admission policy's side is tests/test_tenancy_cluster.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from research_api.researchjob import AnalystStatus, Phase, ResearchJobSpec, ResearchJobStatus
from research_operator.constants import plan_id
from research_operator.decisions.reconcile import JobView, Observed, StoreView, Waiting, decide
from research_operator.decisions.status import apply_waiting
from research_operator.decisions.tenancy import (
    Allowlists,
    AuthorChecks,
    Reference,
    RefusalReason,
    author_checks,
    parse_allowlist,
    references,
    refusal,
    scheduling_violations,
)
from research_operator.settings import Settings

T0 = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
PID = plan_id(None)
DEFAULTS = Allowlists()


def spec(**over: Any) -> ResearchJobSpec:
    base: dict[str, Any] = {"topic": "tenancy", "analysts": {"count": 2}, "sources": [{"type": "wikipedia"}]}
    base.update(over)
    return ResearchJobSpec.model_validate(base)


KEYED = spec(
    model={"baseUrl": "http://listener.attacker:9000/v1", "apiKeySecretRef": {"name": "llm", "key": "k"}},
    sources=[
        {"type": "documents", "configMap": "corpus"},
        {"type": "tavily", "apiKeySecretRef": {"name": "tavily", "key": "k"}},
    ],
    store={"type": "postgres", "dsnSecretRef": {"name": "pg", "key": "dsn"}},
)
SYSTEM_PRIORITY = {"priorityClassName": "system-cluster-critical"}
CONTROL_PLANE = {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}


# -- references and allowlists ---------------------------------------------------------------


def test_every_secret_and_documents_configmap_is_a_reference_with_its_field() -> None:
    assert references(KEYED) == [
        Reference("Secret", "llm", "spec.model.apiKeySecretRef"),
        Reference("ConfigMap", "corpus", "spec.sources[0].configMap"),
        Reference("Secret", "tavily", "spec.sources[1].apiKeySecretRef"),
        Reference("Secret", "pg", "spec.store.dsnSecretRef"),
    ]
    assert references(spec()) == []


def test_system_priority_and_control_plane_toleration_are_refused_by_default_naming_the_field() -> None:
    v = scheduling_violations(spec(worker={**SYSTEM_PRIORITY, **CONTROL_PLANE}).worker, DEFAULTS)
    assert [f for f, _ in v] == ["spec.worker.priorityClassName", "spec.worker.tolerations"]
    assert 'PriorityClass "system-cluster-critical" is not allowed' in v[0][1]
    assert "node-role.kubernetes.io/control-plane is not allowed" in v[1][1]
    assert "tenancy.allowedTolerationKeys" in v[1][1]


def test_allowlisted_scheduling_fields_pass_and_star_allows_any() -> None:
    worker = spec(
        worker={
            "priorityClassName": "research-high",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "nodeSelector": {"kubernetes.io/arch": "arm64", "pool": "gpu"},
        }
    ).worker
    allow = Allowlists(("research-high",), ("nvidia.com/gpu",), ("kubernetes.io/arch", "pool"))
    assert scheduling_violations(worker, allow) == []
    assert scheduling_violations(worker, Allowlists(("*",), ("*",), ("*",))) == []
    assert [f for f, _ in scheduling_violations(worker, DEFAULTS)] == [
        "spec.worker.priorityClassName",
        "spec.worker.tolerations",
        "spec.worker.nodeSelector",
    ]


def test_a_toleration_without_key_tolerates_every_taint_and_needs_star() -> None:
    worker = spec(worker={"tolerations": [{"operator": "Exists"}]}).worker
    (violation,) = scheduling_violations(worker, Allowlists(toleration_keys=("dedicated",)))
    assert "(no key: tolerates every taint)" in violation[1]
    assert scheduling_violations(worker, Allowlists(toleration_keys=("*",))) == []


def test_default_node_selector_keys_choose_where_never_a_node_role() -> None:
    ok = spec(worker={"nodeSelector": {"kubernetes.io/os": "linux", "topology.kubernetes.io/zone": "a"}})
    assert scheduling_violations(ok.worker, DEFAULTS) == []
    bad = spec(worker={"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}})
    assert [f for f, _ in scheduling_violations(bad.worker, DEFAULTS)] == ["spec.worker.nodeSelector"]


@pytest.mark.parametrize("raw", ["a b", "bad,/x", "-lead"])
def test_allowlist_entries_that_are_no_names_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="allowedX"):
        parse_allowlist(raw, "allowedX")


def test_allowlists_are_comma_separated_as_the_policy_splits_them() -> None:
    assert parse_allowlist(" research-low, research-high ,", "k") == ("research-low", "research-high")
    assert parse_allowlist("", "k") == ()


# -- whether authors were checked ------------------------------------------------------------


def test_author_checks_follow_the_binding_found_and_the_admins_trust() -> None:
    bound = ("ro-research-operator-tenancy", ["Deny"], None)
    assert author_checks("b", False, bound) == AuthorChecks.ENFORCED
    assert author_checks("b", False, None) == AuthorChecks.MISSING
    assert author_checks("", False, None) == AuthorChecks.OFF
    assert author_checks("", True, None) == AuthorChecks.TRUSTED
    assert author_checks("b", True, None) == AuthorChecks.TRUSTED
    # A binding that only warns or audits refuses nothing: it checks nobody.
    assert author_checks("b", False, ("p", ["Warn", "Audit"], None)) == AuthorChecks.MISSING


def test_unchecked_references_refuse_naming_each_and_how_to_enable_the_check() -> None:
    r = refusal(KEYED, DEFAULTS, AuthorChecks.MISSING, "ro-research-operator-tenancy")
    assert r is not None and r.reason == RefusalReason.AUTHOR_NOT_CHECKED and r.recheck
    assert r.field == "spec.model.apiKeySecretRef"
    for text in ('Secret "llm"', 'ConfigMap "corpus"', 'Secret "tavily"', 'Secret "pg"', "tenancy.trustAuthors=true"):
        assert text in r.message
    assert "ro-research-operator-tenancy" in r.message and "tenancy.admissionPolicy.enabled=true" in r.message
    off = refusal(KEYED, DEFAULTS, AuthorChecks.OFF)
    assert off is not None and not off.recheck and "tenancy.admissionPolicy.enabled=false" in off.message


def test_checked_or_trusted_references_and_none_at_all_run() -> None:
    assert refusal(KEYED, DEFAULTS, AuthorChecks.ENFORCED) is None
    assert refusal(KEYED, DEFAULTS, AuthorChecks.TRUSTED) is None
    assert refusal(spec(), DEFAULTS, AuthorChecks.OFF) is None


def test_trusting_authors_never_lifts_the_scheduling_allowlists() -> None:
    r = refusal(spec(worker=SYSTEM_PRIORITY), DEFAULTS, AuthorChecks.TRUSTED)
    assert r is not None and r.reason == RefusalReason.SCHEDULING and r.field == "spec.worker.priorityClassName"


# -- settings --------------------------------------------------------------------------------


def test_settings_read_tenancy_from_env_and_configmap_and_refuse_garbage() -> None:
    s = Settings.from_env({"ADMISSION_POLICY_BINDING": "b", "ALLOWED_PRIORITY_CLASSES": "research-high"})
    assert s.admission_policy_binding == "b" and s.allowlists.priority_classes == ("research-high",)
    assert s.trust_authors is False and s.allowlists.node_selector_keys == DEFAULTS.node_selector_keys
    t = s.with_configmap({"trustAuthors": "true", "allowedTolerationKeys": "dedicated", "admissionPolicyBinding": ""})
    assert t.trust_authors and t.allowlists.toleration_keys == ("dedicated",) and t.admission_policy_binding == ""
    with pytest.raises(ValueError, match="trustAuthors"):
        s.with_configmap({"trustAuthors": "yes"})


# -- status of a refused ResearchJob ---------------------------------------------------------


def observe(refused: Any, jobs: list[JobView] | None = None, store: StoreView | None = None) -> Observed:
    return Observed(
        generation=1,
        created=T0,
        now=T0,
        jobs=jobs or [],
        store=store or StoreView(),
        previous=ResearchJobStatus(),
        refusal=refused,
    )


def test_a_refused_researchjob_creates_nothing_waits_pending_and_says_why() -> None:
    r = refusal(KEYED, DEFAULTS, AuthorChecks.MISSING, "b")
    assert r is not None
    d = decide(KEYED, observe(r))
    assert not d.create_plan and not d.create_writer and not d.waiting_batches
    assert d.status.phase == Phase.Pending
    assert d.status.message == r.message
    cond = next(c for c in d.status.conditions or [] if c.type == "PolicyViolation")
    assert (cond.status, cond.reason) == ("True", "AuthorNotChecked")
    assert ("Warning", "PolicyViolation", r.message) in d.notices
    # Installing the policy sends no event the operator watches: it looks again soon.
    assert d.wake_at == T0 + dt.timedelta(seconds=30)
    # The waiting column shows it, and an admission pass with nothing to admit keeps it.
    apply_waiting(d.status, ResearchJobStatus(), Waiting(), 1, T0)
    assert d.status.waiting_for == "PolicyViolation"


def test_a_running_researchjob_refused_later_starts_no_more_batches_and_keeps_its_running_ones() -> None:
    batch = JobView(name="rj-b0", step="interview", plan=PID, batch=0, uid="u0", pods=1)
    s = spec(worker=SYSTEM_PRIORITY, analysts={"count": 4}, parallelism={"batchSize": 2, "maxActiveJobs": 2})
    store = StoreView(
        analysts={PID: [AnalystStatus(name=f"A{i}", role="r", affiliation="a", description="d") for i in range(4)]}
    )
    d = decide(s, observe(refusal(s, DEFAULTS, AuthorChecks.OFF), [batch], store))
    assert d.waiting_batches == [] and d.delete_jobs == []
    assert d.status.phase == Phase.Interviewing
    cond = next(c for c in d.status.conditions or [] if c.type == "PolicyViolation")
    assert (cond.status, cond.reason) == ("True", "SchedulingNotAllowed")
    assert "spec.worker.priorityClassName" in cond.message


def test_within_policy_the_condition_is_false_and_work_starts() -> None:
    d = decide(KEYED, observe(None))
    assert d.create_plan and d.status.phase == Phase.Planning
    cond = next(c for c in d.status.conditions or [] if c.type == "PolicyViolation")
    assert (cond.status, cond.reason) == ("False", "WithinPolicy")
    assert d.notices == []


def test_a_researchjob_created_before_the_policy_is_held_unless_it_already_started() -> None:
    """The policy checks creates and updates, not what exists: a ResearchJob created before it came
    into force was never checked. One that already runs goes on (a helm upgrade must not stop a
    cluster's work); one that has not started waits to be created again."""
    import datetime as dt

    from research_operator.decisions.tenancy import predates_policy

    since = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
    before, after = since - dt.timedelta(minutes=5), since + dt.timedelta(seconds=6)
    r = predates_policy(KEYED, before, False, since)
    assert r is not None and r.reason == RefusalReason.AUTHOR_NOT_CHECKED
    assert "before the admission policy" in r.message and "create it again" in r.message
    assert predates_policy(KEYED, before, True, since) is None  # it runs already
    assert predates_policy(KEYED, after, False, since) is None  # checked at its create
    # The same second as the policy (timestamps are whole seconds), or before the API server loaded
    # it: it may not have been checked, so it is held too.
    assert predates_policy(KEYED, since, False, since) is not None
    assert predates_policy(KEYED, since + dt.timedelta(seconds=1), False, since) is not None
    assert predates_policy(KEYED, before, False, None) is None  # no time known: nothing to compare


def test_a_kueue_priority_must_be_one_admins_defined_unless_classes_are_allowed_by_name() -> None:
    kueue = Settings(kueue_queue="research", kueue_priority_classes=(("high", "research-high"),))
    refused = refusal(spec(priority="highest-of-all"), kueue.allowlists, AuthorChecks.ENFORCED)
    assert refused is not None and refused.reason == RefusalReason.SCHEDULING and refused.field == "spec.priority"
    assert '"highest-of-all" is not a priority of this cluster (defined: high;' in refused.message
    assert refusal(spec(priority="high"), kueue.allowlists, AuthorChecks.ENFORCED) is None
    assert refusal(spec(), kueue.allowlists, AuthorChecks.ENFORCED) is None  # the default class
    named = Settings(
        kueue_queue="research", kueue_priority_classes=(("high", "research-high"),),
        allowed_workload_priority_classes=("research-batch",),
    )  # fmt: skip
    assert refusal(spec(priority="research-batch"), named.allowlists, AuthorChecks.ENFORCED) is None
    assert refusal(spec(priority="highest-of-all"), named.allowlists, AuthorChecks.ENFORCED) is not None
    # Without Kueue, spec.priority does nothing, so nothing to refuse.
    assert refusal(spec(priority="highest-of-all"), Settings().allowlists, AuthorChecks.ENFORCED) is None
