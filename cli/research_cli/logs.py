"""``logs``: the worker pods' logs of a ResearchJob.

Pods are found by the label ``researchops.io/job`` and kept only if their Job is owned by this
ResearchJob (its uid), so a namesake in another life is never shown. Each log is read through the
API (``pods/log``, which the API server fetches from the node's kubelet). The local control plane's
node agent has no kubelet API (docs/node-agent.md): there a pod's log is a file under the cluster's
state dir, read when the API cannot serve it. Succeeded worker Jobs are deleted once their results
are stored, and their pods with them; on the local cluster their log files stay and are shown too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research_api.environment import TASK_ENV
from research_api.names import LABEL_JOB, LABEL_STEP
from research_cli.errors import CliError
from research_cli.kube import Kube
from research_cli.progress import parse_time


@dataclass(frozen=True)
class WorkerPod:
    name: str
    step: str
    analysts: tuple[int, ...] | None  # the interview batch's analyst indices, when known
    created: str
    node: str | None = None
    log_file: Path | None = None  # a finished pod's log file on the local cluster


def batch_members(batch: int, count: int, batch_size: int) -> tuple[int, ...]:
    return tuple(range(batch * batch_size, min((batch + 1) * batch_size, count)))


def _task_analysts(pod: dict[str, Any]) -> tuple[int, ...] | None:
    """The analysts of an interview pod, from the task the operator gave it."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for e in c.get("env") or []:
            if e.get("name") == TASK_ENV and e.get("value"):
                try:
                    return tuple(int(i) for i in json.loads(e["value"]).get("analysts") or [])
                except (ValueError, TypeError, AttributeError):
                    return None
    return None


def api_pods(kube: Kube, rj: dict[str, Any]) -> list[WorkerPod]:
    ns, uid = rj["metadata"]["namespace"], rj["metadata"]["uid"]
    name = rj["metadata"]["name"]
    selector = f"{LABEL_JOB}={name}"
    jobs = kube.items(
        f"list the worker Jobs of {ns}/{name}", kube.batch.list_namespaced_job, ns, label_selector=selector
    )
    ours = {
        j["metadata"]["name"]
        for j in jobs
        if any(r.get("uid") == uid for r in j["metadata"].get("ownerReferences") or [])
    }
    pods = kube.items(
        f"list the worker pods of {ns}/{name}", kube.core.list_namespaced_pod, ns, label_selector=selector
    )
    out = []
    for p in pods:
        labels = p["metadata"].get("labels") or {}
        if labels.get("job-name") not in ours:
            continue
        out.append(
            WorkerPod(
                str(p["metadata"]["name"]),
                str(labels.get(LABEL_STEP, "")),
                _task_analysts(p),
                str(p["metadata"].get("creationTimestamp") or ""),
                (p.get("spec") or {}).get("nodeName"),
            )
        )
    return sorted(out, key=lambda p: (p.created, p.name))


def local_pods_dir(kube: Kube) -> Path | None:
    """The local cluster's pod log folder (``<state dir>/nodes/pods``), if this is one."""
    candidates = [os.environ.get("LOCALKUBE_STATE_DIR")]
    if kube.kubeconfig:
        candidates.append(str(Path(kube.kubeconfig).resolve().parent))
    for c in candidates:
        if c and (Path(c) / "nodes" / "pods").is_dir() and (Path(c) / "cluster.json").exists():
            return Path(c) / "nodes" / "pods"
    return None


def local_finished_pods(pods_dir: Path, rj: dict[str, Any]) -> list[WorkerPod]:
    """Log files of worker pods that are gone (their Jobs were deleted), made since this ResearchJob
    was created. Pod folders are ``<ns>_<pod>_<uid>``; worker pods are ``<job>-<plan>-<step>-<x>``."""
    meta, spec = rj["metadata"], rj.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    count = int((spec.get("analysts") or {}).get("count") or 3)
    size = int((spec.get("parallelism") or {}).get("batchSize") or 2)
    job = rf"{re.escape(name)}-[0-9a-f]{{6}}-(plan|write|b(\d+))"
    pattern = re.compile(rf"^{re.escape(ns)}_({job}-[a-z0-9]{{5}})_[^_]+$")
    created = parse_time(meta.get("creationTimestamp"))
    out = []
    for d in pods_dir.iterdir():
        m = pattern.match(d.name)
        if not m:
            continue
        mtime = d.stat().st_mtime
        if created is not None and mtime < created.timestamp() - 1:
            continue  # a pod of an earlier ResearchJob of the same name
        step = "interview" if m.group(3) is not None else m.group(2)
        analysts = batch_members(int(m.group(3)), count, size) if m.group(3) is not None else None
        if step == "plan":  # a planner goes on to interview batch 0, unless review or a budget came between
            analysts = batch_members(0, count, size)
        for log in sorted(d.glob("*.log")):
            out.append(WorkerPod(m.group(1), step, analysts, str(mtime), None, log))
    return sorted(out, key=lambda p: (p.created, p.name))


def pod_log(kube: Kube, namespace: str, pod: WorkerPod, pods_dir: Path | None, tail: int | None) -> str:
    if pod.log_file is not None:
        return _tail(pod.log_file.read_text(errors="replace"), tail)
    try:
        kwargs: dict[str, Any] = {"tail_lines": tail} if tail is not None else {}
        text = kube.call(
            f"get the log of pod {namespace}/{pod.name}",
            kube.core.read_namespaced_pod_log,
            pod.name,
            namespace,
            **kwargs,
        )
        return str(text)
    except CliError as exc:
        files = (
            sorted(p for d in pods_dir.glob(f"{namespace}_{pod.name}_*") for p in d.glob("*.log")) if pods_dir else []
        )
        if not files:
            raise CliError(f"{exc} (the node of pod {pod.name} serves no logs?)") from None
        return _tail("".join(f.read_text(errors="replace") for f in files), tail)


def _tail(text: str, tail: int | None) -> str:
    if tail is None or tail < 0:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(lines[-tail:]) if tail else ""


def select(pods: list[WorkerPod], analyst: int | None, step: str | None) -> list[WorkerPod]:
    out = pods
    if step:
        out = [p for p in out if p.step == step]
    if analyst is not None:
        out = [p for p in out if p.analysts is not None and analyst in p.analysts]
    return out
