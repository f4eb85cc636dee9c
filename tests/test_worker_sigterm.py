"""SIGTERM (a pod delete, preemption, eviction) to a worker that is its pid namespace's pid 1, as in a
container: it stops calling the model at once, keeps what it stored, exits 143, and the retried
step redoes no stored section (the offline model server and a real PostgreSQL; no cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from research_api.exitcodes import EXIT_STOPPED
from tests.test_worker_e2e import KEY, _stored_sections, make_task, worker

pytestmark = pytest.mark.postgres


def pid_one_of(unshare: subprocess.Popen[str], deadline: float) -> int:
    """The host pid of the process ``unshare --pid --fork`` started, once it is its namespace's pid 1."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    while True:
        assert unshare.poll() is None and time.monotonic() < deadline, "the worker did not start"
        pids = children.read_text().split()
        if pids:
            status = Path(f"/proc/{pids[0]}/status").read_text()
            nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
            if nspid[-1] == "1":
                return int(pids[0])
        time.sleep(0.02)


@pytest.mark.skipif(os.geteuid() != 0, reason="a pid namespace of its own needs root (unshare --pid)")
def test_sigterm_to_a_pid_one_worker_keeps_what_is_stored_and_the_retry_redoes_none_of_it(
    modelserver_factory: Any, postgres_dsn: str, tmp_path: Path
) -> None:
    server = modelserver_factory(ttft_ms=150)
    task = make_task(tmp_path, server.base_url, store={"type": "postgres"}, interviewConcurrency=1)
    uid = json.loads(task.read_text())["job"]["uid"]
    assert worker("plan", task, dsn=postgres_dsn).returncode == 0
    server.reset()
    env = {**os.environ, "OPENAI_API_KEY": KEY, "RESEARCH_PG_DSN": postgres_dsn}
    cmd = [sys.executable, "-m", "research_worker.cli", "interview", "--task", str(task)]
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        pid1 = pid_one_of(proc, deadline)
        while not _stored_sections(postgres_dsn, uid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        at_first = server.stats()["total"]
        while server.stats()["total"] < at_first + 3:  # the second analyst is mid-interview
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # let the checkpoint of the last finished node land
        os.kill(pid1, signal.SIGTERM)
        calls_at_sigterm = server.stats()["total"]
        # A pid 1 without a handler ignores SIGTERM and would run on to the end (or to a SIGKILL).
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_STOPPED, err
    assert "SIGTERM: stopping; no further model calls, what is stored stays stored" in err
    assert "research-worker interview: error: SIGTERM" in err
    # At most the one request already on its way when the signal came; none started after it.
    assert server.stats()["total"] <= calls_at_sigterm + 1, "the worker went on calling the model"
    # The first analyst's section, and the second's when it ended in the moment before the signal.
    stored = _stored_sections(postgres_dsn, uid)
    assert stored in ({0}, {0, 1}), stored
    server.reset()
    r = worker("interview", task, dsn=postgres_dsn)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"written": sorted({0, 1, 2} - stored), "skipped": sorted(stored)}
    if stored == {0}:  # stopped mid-interview of the second analyst: its checkpoint is resumed
        assert "resuming the interview" in r.stderr
    assert server.stats()["by_kind"]["section"] == 3 - len(stored), "a section stored before SIGTERM was made again"
    assert _stored_sections(postgres_dsn, uid) == {0, 1, 2}


def test_sigterm_mid_call_with_the_postgres_store_lets_the_call_finish_and_the_retry_pays_for_no_call_twice(
    modelserver_factory: Any, postgres_dsn: str, tmp_path: Path
) -> None:
    """A preemption or eviction (SIGTERM) while a call is in flight: with the PostgreSQL store the call
    finishes within the drain, its node is checkpointed, and the retried pod resumes after it. Every
    call of the interviews is served exactly once over the two pods: nothing is paid for twice."""
    server = modelserver_factory(ttft_ms=400)
    task = make_task(tmp_path, server.base_url, store={"type": "postgres"}, interviewConcurrency=1)
    assert worker("plan", task, dsn=postgres_dsn).returncode == 0
    server.reset()
    env = {**os.environ, "OPENAI_API_KEY": KEY, "RESEARCH_PG_DSN": postgres_dsn}
    cmd = [sys.executable, "-m", "research_worker.cli", "interview", "--task", str(task)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        # Mid-interview, a call on its way: the second call of the first analyst is in flight.
        while not (server.stats()["total"] >= 1 and server.stats()["running"] >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the interview did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_STOPPED, err
    assert "the calls in flight may finish within" in err
    stopped = server.stats()
    assert stopped["by_status"].get("499", 0) == 0 and stopped["running"] == 0, "no call was cut off"
    r = worker("interview", task, dsn=postgres_dsn)
    assert r.returncode == 0, r.stderr
    assert "resuming the interview" in r.stderr
    full_interview = 7  # (question, query, answer) x 2 turns + section
    assert server.stats()["total"] == 3 * full_interview, "a call was paid for twice"
