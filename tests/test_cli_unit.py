"""kubectl research without a cluster: the corpus and ResearchJob builders, the progress lines,
the top view's arithmetic, the caps' validation, and one-line errors for bad input."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from research_api.names import CONFIGMAP_DATA_LIMIT
from research_cli import admin, cli, progress, submit
from research_cli.errors import CliError, UsageError

PLUGIN = Path(sys.executable).parent / "kubectl-research"
NOW = dt.datetime(2026, 1, 1, 12, 0, 30, tzinfo=dt.UTC)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PLUGIN), *args], capture_output=True, text=True, timeout=60, env=env)


def flags(**over: Any) -> SimpleNamespace:
    base: dict[str, Any] = dict(
        topic="How clusters share GPUs",
        analysts=4,
        batch_size=2,
        max_active_jobs=2,
        max_turns=None,
        documents=None,
        documents_configmap=None,
        wikipedia=False,
        tavily=None,
        max_results=None,
        model=None,
        base_url=None,
        api_key_secret=None,
        max_tokens=None,
        deadline=None,
        postgres_dsn_secret=None,
        review=False,
        ttl=None,
        min_citation_accuracy=None,
        min_coverage=None,
    )
    base.update(over)
    return SimpleNamespace(**base)


def rj(name: str, ns: str = "team-a", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T12:00:00Z"},
        "spec": {"analysts": {"count": 4}, "parallelism": {"maxActiveJobs": 4}},
        "status": {"startTime": "2026-01-01T12:00:00Z", **status},
    }


# ------------------------------------------------------------------------------------------------ corpus


def test_a_documents_folder_becomes_one_key_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\nalpha")
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / ".hidden").write_text("skip me")
    (tmp_path / "sub").mkdir()
    corpus = submit.read_corpus(tmp_path)
    assert corpus.data == {"a.md": "# A\nalpha", "b.txt": "beta"}
    cm = submit.corpus_configmap("gpu", "team-a", corpus)
    assert cm["metadata"]["name"] == "gpu-documents" and cm["data"] == corpus.data


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="no documents in"):
        submit.read_corpus(tmp_path)


def test_a_corpus_over_the_configmap_limit_is_refused_saying_by_how_much(tmp_path: Path) -> None:
    (tmp_path / "big.md").write_text("x" * (CONFIGMAP_DATA_LIMIT - 10))
    (tmp_path / "more.md").write_text("y" * 100)
    with pytest.raises(CliError, match=r"more than the 1048576 bytes \(1 MiB\) a ConfigMap can hold"):
        submit.read_corpus(tmp_path)


def test_a_binary_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(CliError, match="not UTF-8 text"):
        submit.read_corpus(tmp_path)


def test_flags_become_a_researchjob_with_its_documents_source(tmp_path: Path) -> None:
    body = submit.researchjob_manifest("gpu", "team-a", flags(documents=tmp_path, wikipedia=True, max_tokens=5000))
    spec = body["spec"]
    assert spec["sources"] == [{"type": "documents", "configMap": "gpu-documents"}, {"type": "wikipedia"}]
    assert spec["parallelism"] == {"batchSize": 2, "maxActiveJobs": 2}
    assert spec["budget"] == {"maxTokens": 5000}


def test_quality_floor_flags_become_spec_quality() -> None:
    body = submit.researchjob_manifest("gpu", "team-a", flags(wikipedia=True, min_citation_accuracy=95))
    assert body["spec"]["quality"] == {"minCitationAccuracy": 95}
    assert "quality" not in submit.researchjob_manifest("gpu", "team-a", flags(wikipedia=True))["spec"]
    with pytest.raises(UsageError, match="quality.minCoverage"):
        submit.researchjob_manifest("gpu", "team-a", flags(wikipedia=True, min_coverage=101))


def test_flags_the_api_refuses_are_refused_before_sending() -> None:
    with pytest.raises(UsageError, match="analysts.count"):
        submit.researchjob_manifest("gpu", "team-a", flags(analysts=51, wikipedia=True))
    with pytest.raises(UsageError, match="no source"):
        submit.researchjob_manifest("gpu", "team-a", flags())


# ------------------------------------------------------------------------------------------------ watch


def test_a_progress_line_shows_sections_batches_tokens_and_why_batches_wait() -> None:
    obj = rj(
        "gpu",
        phase="Interviewing",
        sectionsDone=1,
        tokensUsed=1200,
        batches={"total": 4, "active": 1, "queued": 2},
        conditions=[{"type": "QuotaExceeded", "status": "True", "message": "ResourceQuota q: pods 1/1"}],
    )
    obj["spec"]["budget"] = {"maxTokens": 10000}
    line = progress.line(progress.snapshot(obj, NOW))
    assert "Interviewing" in line and "sections 1/4" in line
    assert "running 1 queued 2" in line and "tokens 1200/10000 (12%)" in line
    assert "waiting for QuotaExceeded: ResourceQuota q: pods 1/1" in line
    assert line.lstrip().startswith("30s")


def test_watch_shows_the_cost_against_a_money_budget_and_submit_sets_one() -> None:
    obj = rj("gpu", phase="Interviewing", tokensUsed=1200, cost="0.0315")
    obj["spec"]["budget"] = {"maxCost": "5.00"}
    s = progress.snapshot(obj, NOW)
    assert "cost 0.0315/5.00" in progress.line(s)
    assert "  cost      0.0315/5.00" in progress.panel("team-a", "gpu", s)
    plain = progress.snapshot(rj("gpu", phase="Interviewing", tokensUsed=1200), NOW)
    assert "cost" not in progress.line(plain)  # an endpoint without prices: nothing to show
    args = cli.build_parser().parse_args(["submit", "gpu", "--topic", "GPUs", "--documents", ".", "--max-cost", "5.00"])
    assert args.max_cost == "5.00"
    with pytest.raises(UsageError, match="not an amount of money: 'five'"):
        cli.build_parser().parse_args(["submit", "gpu", "--topic", "GPUs", "--documents", ".", "--max-cost", "five"])


def test_a_finished_jobs_line_and_panel_show_its_quality_figures() -> None:
    quality = {
        "sentencesChecked": 30,
        "sentencesSupported": 28,
        "sentencesRecited": 1,
        "sentencesDropped": 1,
        "citationAccuracy": 93,
        "sourcesRetrieved": 7,
        "sourcesCited": 5,
        "relevantDocuments": 6,
        "relevantCited": 5,
        "coverage": 83,
        "unreachedDocuments": ["dances.md"],
    }
    snap = progress.snapshot(rj("gpu", phase="Succeeded", quality=quality), NOW)
    expected = (
        "cited 28/30 supported (93%) [1 re-cited, 1 dropped], coverage 5/6 (83%), sources 5 cited of 7 retrieved; "
        "not cited: dances.md"
    )
    assert f"quality {expected}" in progress.line(snap)
    assert f"  quality   {expected}" in progress.panel("team-a", "gpu", snap)
    assert "quality" not in progress.line(progress.snapshot(rj("gpu", phase="Writing"), NOW))


def test_only_what_the_job_did_counts_as_a_change() -> None:
    a = progress.snapshot(rj("gpu", phase="Planning"), NOW)
    b = progress.snapshot(rj("gpu", phase="Planning"), NOW + dt.timedelta(seconds=5))
    c = progress.snapshot(rj("gpu", phase="Interviewing"), NOW)
    assert a.change_key() == b.change_key() != c.change_key()


def test_batches_queued_behind_the_jobs_own_limit_say_so() -> None:
    obj = rj("gpu", phase="Interviewing", batches={"active": 4, "queued": 2})
    assert "its own maxActiveJobs (4)" in (progress.waiting_for(obj) or "")


def test_only_waiting_conditions_are_reasons_to_wait() -> None:
    review = {"type": "AwaitingReview", "status": "True", "message": "approve with ..."}
    other = {"type": "CleanupFailed", "status": "True", "message": "cleanup Job failed"}
    planned = {"type": "Planned", "status": "True", "message": ""}
    assert progress.waiting_for(rj("gpu", phase="AwaitingReview", conditions=[planned, review])) == (
        "AwaitingReview: approve with ..."
    )
    assert progress.waiting_for(rj("gpu", phase="Interviewing", conditions=[planned, other])) is None
    assert progress.waiting_for(rj("gpu", phase="Succeeded", conditions=[review])) is None


# ------------------------------------------------------------------------------------------------ top, caps


def settings(**data: str) -> admin.SettingsRef:
    return admin.SettingsRef("research-operator-system", "research-operator-settings", data, "1", "research-operator")


def job(ns: str, *, done: bool = False) -> dict[str, Any]:
    conds = [{"type": "Complete", "status": "True"}] if done else []
    return {"metadata": {"namespace": ns, "name": "j"}, "spec": {}, "status": {"conditions": conds}}


def test_top_counts_running_jobs_and_quota_headroom_in_worker_pods() -> None:
    quota = {
        "metadata": {"namespace": "team-a", "name": "compute"},
        "status": {"hard": {"requests.cpu": "1", "pods": "10"}, "used": {"requests.cpu": "600m", "pods": "3"}},
    }
    waiting = rj("big", phase="Interviewing", batches={"active": 1, "queued": 3})
    view = admin.build_top(
        None,
        [waiting, rj("done", ns="team-b", phase="Succeeded")],
        [job("team-a"), job("team-a", done=True), job("team-b")],
        [quota],
        settings(globalMaxActiveJobs="2", namespaceMaxActiveJobs="0"),
    )
    assert (view.running, view.queued, view.global_cap, view.namespace_cap) == (2, 3, 2, 0)
    assert {(n.namespace, n.running, n.queued) for n in view.namespaces} == {("team-a", 1, 3), ("team-b", 1, 0)}
    # a default worker pod requests 100m: 400m left is 4 pods, fewer than the 7 pods left
    assert [(q.name, q.headroom, q.binding) for q in view.quotas] == [("compute", 4, "requests.cpu 600m/1")]
    assert [w.name for w in view.waiting] == ["big"]
    assert "globalMaxActiveJobs is 2" in view.waiting[0].waiting_for


def test_top_counts_a_suspended_kueue_job_as_the_operator_does() -> None:
    """In Kueue mode a worker Job waits suspended in its LocalQueue and holds its slot under the
    caps (the operator counts it): top must say the same, or it shows a free slot that is not."""
    suspended = {**job("team-a"), "spec": {"suspend": True}}
    view = admin.build_top(None, [], [suspended, job("team-a", done=True)], [], settings(globalMaxActiveJobs="1"))
    assert view.running == 1
    assert [(n.namespace, n.running) for n in view.namespaces] == [("team-a", 1)]


def test_caps_accept_whole_numbers_and_refuse_anything_else() -> None:
    assert admin.parse_assignments(["globalMaxActiveJobs=10", "namespace=4"]) == {
        "globalMaxActiveJobs": 10,
        "namespaceMaxActiveJobs": 4,
    }
    for bad, why in (
        ("globalMaxActiveJobs=-1", "whole number"),
        ("globalMaxActiveJobs=ten", "whole number"),
        ("maxJobs=3", "unknown cap"),
        ("globalMaxActiveJobs", "not KEY=VALUE"),
    ):
        with pytest.raises(UsageError, match=why):
            admin.parse_assignments([bad])


# ------------------------------------------------------------------------------------------------ errors


def test_missing_topic_is_one_line_and_exit_2() -> None:
    out = run("submit", "gpu", "--wikipedia")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--topic" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_cluster_is_one_line_and_exit_1(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    for args in (["watch", "gpu"], ["top"], ["caps"], ["report", "gpu"]):
        out = run(*args, "--kubeconfig", str(kubeconfig))
        assert out.returncode == 1, out
        assert out.stderr.startswith("error: cannot reach the Kubernetes API server at https://127.0.0.1:1"), out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = run("top", env={"KUBECONFIG": str(tmp_path / "missing"), "PATH": "/usr/bin"})
    assert out.returncode == 1 and out.stderr.startswith("error: no kubeconfig at") and out.stderr.count("\n") == 1


def test_every_command_has_help() -> None:
    for command in ("submit", "watch", "analysts", "approve", "feedback", "report", "logs", "top", "caps"):
        out = run(command, "--help")
        assert out.returncode == 0 and "--namespace" in out.stdout and out.stdout.startswith("usage: kubectl research")


# ------------------------------------------------------------------------------------------------ logs


def test_finished_worker_pods_are_found_in_the_local_clusters_log_files_of_this_job_only(tmp_path: Path) -> None:
    from research_cli import logs

    obj = rj("gpu")
    obj["spec"]["parallelism"]["batchSize"] = 2
    for pod_dir in (
        "team-a_gpu-e3b0c4-plan-abcde_uid1",
        "team-a_gpu-e3b0c4-b1-fghij_uid2",
        "team-a_gpu-e3b0c4-write-klmno_uid3",
        "team-a_gpu-x-e3b0c4-b0-pqrst_uid4",  # another ResearchJob, "gpu-x"
        "team-b_gpu-e3b0c4-b0-uvwxy_uid5",  # another namespace
    ):
        (tmp_path / pod_dir).mkdir()
        (tmp_path / pod_dir / "worker.log").write_text(f"log of {pod_dir}\n")
    pods = logs.local_finished_pods(tmp_path, obj)
    assert sorted((p.name, p.step, p.analysts) for p in pods) == [
        ("gpu-e3b0c4-b1-fghij", "interview", (2, 3)),
        ("gpu-e3b0c4-plan-abcde", "plan", (0, 1)),  # the planner goes on to interview batch 0
        ("gpu-e3b0c4-write-klmno", "write", None),
    ]
    assert [p.name for p in logs.select(pods, 3, None)] == ["gpu-e3b0c4-b1-fghij"]
    assert [p.name for p in logs.select(pods, 0, None)] == ["gpu-e3b0c4-plan-abcde"]


def test_top_and_caps_read_the_caps_as_the_operator_does() -> None:
    """`kubectl research top` and `caps` take the caps through the operator's own parsing of its
    settings ConfigMap: what it refuses whole (a value that does not parse, even of another key) is
    shown as unknown, not as the cap the operator does not apply."""
    from research_operator.settings import Settings

    good = {"globalMaxActiveJobs": "6", "namespaceMaxActiveJobs": "2"}
    caps = admin.caps_in_force(good)
    assert caps == Settings().with_configmap(good).caps
    assert (admin.cap_value(caps, "globalMaxActiveJobs"), admin.cap_value(caps, "namespaceMaxActiveJobs")) == (6, 2)
    assert admin.cap_value(admin.caps_in_force({}), "globalMaxActiveJobs") == 0  # unset: unlimited
    refused = {"globalMaxActiveJobs": "6", "namespaceTokenBudgets": "{not json"}
    with pytest.raises(ValueError):
        Settings().with_configmap(refused)
    assert admin.caps_in_force(refused) is None
    assert admin.cap_text(admin.cap_value(admin.caps_in_force(refused), "globalMaxActiveJobs")) == "unknown"
