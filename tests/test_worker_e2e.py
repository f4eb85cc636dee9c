"""The worker's CLI against the offline model server over HTTP (and a real PostgreSQL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from offline_model.launcher import ModelServerProcess, free_port

CORPUS = Path(__file__).parent / "corpus"
CORPUS_FILES = {p.name for p in CORPUS.glob("*.md")}
TOPIC = "How Kubernetes schedules and limits batch workloads"
KEY = "sk-test-not-a-real-key"


def make_task(tmp: Path, base_url: str, **over: Any) -> Path:
    t: dict[str, Any] = {
        "job": {"namespace": "research", "name": "rj-test", "uid": str(uuid.uuid4())},
        "topic": TOPIC,
        "maxAnalysts": 3,
        "maxTurns": 2,
        "model": {"name": "offline-research-1", "baseUrl": base_url, "maxConcurrency": 4},
        "sources": [{"type": "documents", "path": str(CORPUS)}],
    }
    t.update(over)
    path = tmp / f"task-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(t))
    return path


def worker(
    step: str, task: Path, *args: str, key: str = KEY, dsn: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": key}
    if dsn:
        env["RESEARCH_PG_DSN"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "research_worker.cli", step, "--task", str(task), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def sections_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("section-*.json"))]


def assert_report_structure(md: str, n_sections: int, sections: list[dict[str, Any]]) -> None:
    assert md.startswith("# ") and "## Introduction" in md and "## Insights" in md and "## Conclusion" in md
    assert md.count("## Sources") == 1
    listed = re.findall(r"^\[(\d+)\] (.+?)\s*$", md.split("## Sources", 1)[1], re.M)
    names = [name for _, name in listed]
    assert names and len(names) == len(set(names)), "every source listed once"
    assert [int(n) for n, _ in listed] == list(range(1, len(listed) + 1))
    assert set(names) <= CORPUS_FILES, "only retrieved corpus documents are cited"
    body = md.split("## Sources", 1)[0]
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", body)}
    assert cited and cited <= set(range(1, len(listed) + 1)), "every citation names a listed source"
    assert len(sections) == n_sections
    for s in sections:
        assert s["found_sources"] and s["sources"] and set(s["sources"]) <= CORPUS_FILES
        assert re.search(r"\[\d+\]", s["summary"]), f"section {s['index']} cites nothing"
        assert "### Summary" in s["content"] and "### Sources" in s["content"]
        for src in s["sources"]:
            assert src in names, "the report lists every source of every section"
        cited_here = {int(n) for n in re.findall(r"\[(\d+)\]", s["summary"])}
        assert cited_here <= set(range(1, len(s["sources"]) + 1))


def test_run_writes_a_cited_report_from_the_corpus(modelserver: ModelServerProcess, tmp_path: Path) -> None:
    modelserver.reset()
    task = make_task(tmp_path, modelserver.base_url)
    out, secs = tmp_path / "report.md", tmp_path / "sections"
    r = worker("run", task, "-o", str(out), "--sections-dir", str(secs), "--usage-file", str(tmp_path / "u.json"))
    assert r.returncode == 0, r.stderr
    sections = sections_of(secs)
    assert_report_structure(out.read_text(), 3, sections)
    stats = modelserver.stats()["by_kind"]
    assert stats["analysts"] == 1 and stats["section"] == 3 and stats["report"] == 1
    assert stats["intro"] == 1 and stats["conclusion"] == 1
    usage = json.loads((tmp_path / "u.json").read_text())["run"]
    assert usage["total_tokens"] > 0 and usage["calls"] == modelserver.stats()["total"]
    assert all(s["usage"]["total_tokens"] > 0 for s in sections)
    assert KEY not in r.stderr + r.stdout


def test_an_empty_documents_source_is_reported_once_and_costs_no_interview_calls(
    modelserver: ModelServerProcess, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    task = make_task(tmp_path, modelserver.base_url, maxAnalysts=2, sources=[{"type": "documents", "path": str(empty)}])
    out, secs = tmp_path / "report.md", tmp_path / "sections"
    modelserver.reset()
    r = worker("run", task, "-o", str(out), "--sections-dir", str(secs))
    assert r.returncode == 0, r.stderr
    assert modelserver.stats()["by_kind"].get("analysts") == 1 and modelserver.stats()["total"] == 1, (
        "planning is the only model call: no interview, no report writing over nothing"
    )
    assert r.stderr.count("holds no .md, .markdown or .txt documents") == 1, r.stderr
    sections = sections_of(secs)
    assert len(sections) == 2
    for s in sections:
        assert s["found_sources"] is False and s["sources"] == []
        assert "holds no .md, .markdown or .txt documents" in s["summary"]
        assert "Sources" not in s["content"] and not re.search(r"\[\d+\]", s["content"])
        assert s["analyst"]["name"] not in s["title"], "a section is titled by its theme, never by a person"
    md = out.read_text()
    assert "## Sources" not in md and not re.search(r"\[\d+\]", md)
    assert md.count("holds no .md, .markdown or .txt documents") == 1, md
    assert all(s["title"] in md for s in sections) and not any(s["analyst"]["name"] in md for s in sections)


@pytest.mark.postgres
def test_plan_interview_in_two_batches_and_write_through_postgres(
    modelserver: ModelServerProcess, postgres_dsn: str, tmp_path: Path
) -> None:
    task = make_task(tmp_path, modelserver.base_url, store={"type": "postgres"})
    r = worker("plan", task, dsn=postgres_dsn)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["analysts"]) == 3
    r = worker("interview", task, "--analysts", "0", dsn=postgres_dsn)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"written": [0], "skipped": []}
    r = worker("write", task, dsn=postgres_dsn)
    assert r.returncode == 2 and "sections of analysts [1, 2] are not stored yet" in r.stderr
    r = worker("interview", task, "--analysts", "1,2", dsn=postgres_dsn)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"written": [1, 2], "skipped": []}
    out, secs = tmp_path / "report.md", tmp_path / "sections"
    r = worker(
        "write",
        task,
        "-o",
        str(out),
        "--sections-dir",
        str(secs),
        "--usage-file",
        str(tmp_path / "u.json"),
        dsn=postgres_dsn,
    )
    assert r.returncode == 0, r.stderr
    assert_report_structure(out.read_text(), 3, sections_of(secs))
    usage = json.loads((tmp_path / "u.json").read_text())
    assert set(usage) == {"plan", "interview/0", "interview/1", "interview/2", "write"}
    with psycopg.connect(postgres_dsn) as conn:
        # Every migration applied, the report claims' table (3) the last.
        assert conn.execute("SELECT max(version) FROM research_schema_version").fetchone() == (3,)
        steps = dict(conn.execute("SELECT step, total_tokens FROM research_usage").fetchall())
        assert all(steps[k] == usage[k]["total_tokens"] for k in usage)


def _stored_sections(dsn: str, uid: str) -> set[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT analyst_index FROM research_sections WHERE job_uid=%s", (uid,)).fetchall()
    return {r[0] for r in rows}


@pytest.mark.postgres
def test_killed_interview_redoes_no_finished_analyst_and_resumes_the_unfinished_one(
    modelserver_factory: Any, postgres_dsn: str, tmp_path: Path
) -> None:
    server = modelserver_factory(ttft_ms=120)
    task = make_task(tmp_path, server.base_url, store={"type": "postgres"}, interviewConcurrency=1)
    uid = json.loads(task.read_text())["job"]["uid"]
    assert worker("plan", task, dsn=postgres_dsn).returncode == 0
    server.reset()
    env = {**os.environ, "OPENAI_API_KEY": KEY, "RESEARCH_PG_DSN": postgres_dsn}
    proc = subprocess.Popen(
        [sys.executable, "-m", "research_worker.cli", "interview", "--task", str(task)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not _stored_sections(postgres_dsn, uid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        at_first = server.stats()["total"]
        while server.stats()["total"] < at_first + 3:  # the second analyst is mid-interview
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # let the checkpoint of the last finished node land
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = _stored_sections(postgres_dsn, uid)
    assert finished == {0}
    server.reset()
    r = worker("interview", task, dsn=postgres_dsn)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"written": [1, 2], "skipped": [0]}
    assert "resuming the interview" in r.stderr
    by_kind = server.stats()["by_kind"]
    assert by_kind["section"] == 2, "no finished analyst wrote its section again"
    full_interview = 7  # (question, query, answer) x 2 turns + section
    assert server.stats()["total"] < 2 * full_interview, "the killed interview resumed instead of restarting"
    assert _stored_sections(postgres_dsn, uid) == {0, 1, 2}


def test_injected_429_and_5xx_do_not_stop_the_steps(modelserver_factory: Any, tmp_path: Path) -> None:
    server = modelserver_factory(
        fault_429_rate=0.1, fault_500_rate=0.05, fault_503_rate=0.05, retry_after_ms=50, fault_seed=3
    )
    task = make_task(
        tmp_path, server.base_url, model={"name": "gpt-4o-mini", "baseUrl": server.base_url, "maxRetries": 8}
    )
    out, secs, usage = tmp_path / "report.md", tmp_path / "sections", tmp_path / "usage.json"
    r = worker("run", task, "-o", str(out), "--sections-dir", str(secs), "--usage-file", str(usage))
    assert r.returncode == 0, r.stderr
    assert_report_structure(out.read_text(), 3, sections_of(secs))
    stats = server.stats()
    assert sum(stats["faults"].values()) >= 3, stats
    # Every 429 the worker was answered (and retried) is in the usage it reports.
    assert json.loads(usage.read_text())["run"]["rate_limited"] == stats["by_status"].get("429", 0) > 0


@pytest.mark.postgres
def test_steps_complete_under_injected_faults(modelserver_factory: Any, postgres_dsn: str, tmp_path: Path) -> None:
    server = modelserver_factory(
        fault_429_rate=0.1, fault_500_rate=0.05, fault_503_rate=0.05, retry_after_ms=50, fault_seed=11
    )
    task = make_task(tmp_path, server.base_url, store={"type": "postgres"}, maxAnalysts=2)
    for step, extra in (
        ("plan", ()),
        ("interview", ("--analysts", "0")),
        ("interview", ("--analysts", "1")),
        ("write", ("-o", str(tmp_path / "r.md"))),
    ):
        r = worker(step, task, *extra, dsn=postgres_dsn)
        assert r.returncode == 0, (step, r.stderr)
    assert "## Sources" in (tmp_path / "r.md").read_text()
    assert sum(server.stats()["faults"].values()) >= 1


def test_wrong_api_key_fails_fast_with_a_clear_message(modelserver_factory: Any, tmp_path: Path) -> None:
    server = modelserver_factory(api_key="the-right-key")
    task = make_task(tmp_path, server.base_url)
    t0 = time.monotonic()
    r = worker("run", task, key="the-wrong-key")
    elapsed = time.monotonic() - t0
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == (
        f"research-worker run: error: model endpoint {server.base_url} "
        "rejected the API key from $OPENAI_API_KEY (HTTP 401)"
    )
    assert "the-wrong-key" not in r.stderr and "the-right-key" not in r.stderr
    assert elapsed < 15
    assert server.stats()["by_kind"].get("analysts", 0) == 0


def test_unreachable_endpoint_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    task = make_task(tmp_path, base)
    t0 = time.monotonic()
    r = worker("run", task)
    assert r.returncode == 3
    assert f"model endpoint {base} is unreachable" in r.stderr.strip().splitlines()[-1]
    assert time.monotonic() - t0 < 30
