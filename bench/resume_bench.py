"""Resume spends little: an interview step killed at random moments and retried re-spends only the
model calls it had not stored.

    .venv/bin/python bench/resume_bench.py [--corpus tests/corpora/miso] [--topic TEXT] [--analysts 5]
        [--turns 3] [--kills 3] [--batch-size 2] [--seeds 5] [--ttft-ms 80] [--signal KILL|TERM]

For each seed, against a throwaway PostgreSQL (the external store: its LangGraph checkpointer records
every finished node of every interview, and each finished section is a row) and the offline model
server (over HTTP, as always):

1. *Baseline.* plan, interview (one worker process per batch of ``--batch-size`` analysts, all at
   once, as the batch Jobs' pods) and write run once with no kill. The offline model is
   deterministic, so what the model server served is what the job needs: calls and tokens.
2. *Chaos.* The job's rows and checkpoints are deleted and it runs again under the same uid; the
   process of a batch still working is SIGKILLed (a pod lost with its node; ``--signal TERM``:
   SIGTERMed as on a preemption, eviction or pod delete, SIGKILLed if still running 30 s later) at
   a random moment, ``--kills`` times, and a new process takes its batch (as the Job controller
   starts a new pod); then the writer.

Each kill falls while the pods work: after 1 to (interview calls / (kills + 1)) more calls were
served, and up to 0.4 s into the calls then in flight. Re-spent tokens = tokens served in the chaos
run - tokens of the baseline; a call cut off in flight counts whole (the offline server finishes and
counts it, as a hosted API bills what it generated before the cut, at most the whole call). Reported
per seed and in all, against the baseline's total.

Loopback only; no cluster (the worker runs as ``research-worker`` processes, as in its pod).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures: the PostgreSQL server the tests use

from offline_model.launcher import ModelServerProcess  # noqa: E402
from research_worker.store.admin import delete_job_rows  # noqa: E402
from tests.fixtures.postgres import running_postgres  # noqa: E402

KEY = "sk-bench-not-a-real-key"


def make_task(folder: Path, base_url: str, corpus: Path, topic: str, analysts: int, turns: int, uid: str) -> Path:
    task = {
        "job": {"namespace": "research", "name": "rj-resume", "uid": uid},
        "topic": topic,
        "maxAnalysts": analysts,
        "maxTurns": turns,
        "model": {"name": "offline-research-1", "baseUrl": base_url, "maxConcurrency": analysts},
        "sources": [{"type": "documents", "path": str(corpus)}],
        "store": {"type": "postgres"},
    }
    path = folder / "task.json"
    path.write_text(json.dumps(task))
    return path


def step(name: str, task: Path, dsn: str, analysts: list[int] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "RESEARCH_PG_DSN": dsn}
    cmd = [sys.executable, "-m", "research_worker.cli", name, "--task", str(task)]
    if analysts is not None:
        cmd += ["--analysts", ",".join(map(str, analysts))]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(name: str, proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {err[-2000:]}")


def tokens(server: ModelServerProcess) -> tuple[int, int]:
    s = server.stats()
    return s["tokens"]["prompt"] + s["tokens"]["completion"], s["total"]


def batches(analysts: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, analysts))) for i in range(0, analysts, size)]


def baseline(server: ModelServerProcess, task: Path, dsn: str, panel: list[list[int]]) -> dict[str, Any]:
    server.reset()
    finish("plan", step("plan", task, dsn))
    before, calls_before = tokens(server)
    for name, proc in [(f"interview {b}", step("interview", task, dsn, b)) for b in panel]:
        finish(name, proc)
    after, calls_after = tokens(server)
    finish("write", step("write", task, dsn))
    total, calls = tokens(server)
    return {"tokens": total, "calls": calls, "interview_calls": calls_after - calls_before}


def chaos(
    server: ModelServerProcess,
    task: Path,
    dsn: str,
    base: dict[str, Any],
    panel: list[list[int]],
    kills: int,
    rng: random.Random,
    how: signal.Signals,
) -> dict[str, Any]:
    server.reset()
    finish("plan", step("plan", task, dsn))
    pods = {i: step("interview", task, dsn, b) for i, b in enumerate(panel)}  # every batch Job's pod at once
    in_flight = 0
    done = 0
    most = max(1, base["interview_calls"] // (kills + 1))
    for _ in range(kills):
        # A random moment while they work: after 1 to `most` more calls were served, part way into
        # the calls then in flight; one pod still working is killed and its Job starts a new one.
        target = server.stats()["total"] + rng.randint(1, most)
        while any(p.poll() is None for p in pods.values()) and server.stats()["total"] < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        alive = [i for i, p in pods.items() if p.poll() is None]
        if not alive:
            break
        victim = rng.choice(alive)
        in_flight += server.stats()["running"]
        pods[victim].send_signal(how)
        try:  # the kubelet's way: SIGTERM, the grace period (30 s), then SIGKILL
            pods[victim].communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pods[victim].kill()
            pods[victim].communicate()
        pods[victim] = step("interview", task, dsn, panel[victim])
        done += 1
    for i, proc in pods.items():
        finish(f"interview {panel[i]}", proc)
    finish("write", step("write", task, dsn))
    time.sleep(1.0)  # calls cut off finish on the server, which counts them whole
    total, calls = tokens(server)
    return {"tokens": total, "calls": calls, "kills": done, "cut": in_flight, "respent": total - base["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "tests" / "corpora" / "miso")
    parser.add_argument("--topic", default="The craft of making miso in Japanese kitchens")
    parser.add_argument("--analysts", type=int, default=5)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=2, help="analysts per worker Job (pod), spec.parallelism.batchSize"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ttft-ms", type=int, default=80, help="the offline model's time to first token")
    parser.add_argument(
        "--signal",
        choices=["KILL", "TERM"],
        default="KILL",
        help="KILL: a node lost, no grace; TERM: preemption, eviction, a pod delete (then SIGKILL after 30 s)",
    )
    args = parser.parse_args()
    corpus = args.corpus / "docs" if (args.corpus / "docs").is_dir() else args.corpus
    rows = []
    with running_postgres() as dsn, tempfile.TemporaryDirectory() as tmp:
        server = ModelServerProcess(ttft_ms=args.ttft_ms).start()
        try:
            for seed in range(args.seeds):
                uid = str(uuid.UUID(int=random.Random(seed).getrandbits(128)))
                task = make_task(Path(tmp), server.base_url, corpus, args.topic, args.analysts, args.turns, uid)
                panel = batches(args.analysts, args.batch_size)
                base = baseline(server, task, dsn, panel)
                asyncio.run(delete_job_rows(dsn, uid))
                how = signal.Signals[f"SIG{args.signal}"]
                got = chaos(server, task, dsn, base, panel, args.kills, random.Random(seed), how)
                asyncio.run(delete_job_rows(dsn, uid))
                share = 100 * got["respent"] / base["tokens"]
                rows.append((seed, base, got, share))
                print(
                    f"seed {seed}: baseline {base['tokens']} tokens in {base['calls']} calls; "
                    f"{got['kills']} kills with {got['cut']} calls in flight; chaos run served {got['tokens']} "
                    f"tokens in {got['calls']} calls; re-spent {got['respent']:.0f} tokens = {share:.1f}%",
                    flush=True,
                )
        finally:
            server.stop()
    shares = [r[3] for r in rows]
    print()
    print(
        f"corpus {args.corpus.name}, {args.analysts} analysts, {args.turns} turns, {args.kills} SIG{args.signal} a run"
    )
    print("| seed | baseline tokens | calls | kills | calls in flight at the signal | re-spent tokens | re-spent % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed, base, got, share in rows:
        print(
            f"| {seed} | {base['tokens']} | {base['calls']} | {got['kills']} | {got['cut']} | "
            f"{got['respent']:.0f} | {share:.1f} |"
        )
    print(f"mean re-spent {statistics.mean(shares):.1f}%, largest {max(shares):.1f}%")


if __name__ == "__main__":
    main()
