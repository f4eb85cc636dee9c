"""``localkube.demo.worker_logs``: the demo shows the worker pods' logs of its own ResearchJob, also of
pods the operator deleted once their results were stored (the real node's kept copies), and never
those of another ResearchJob: an earlier one of the same name, one whose name starts with it, one
of another namespace."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localkube import demo
from localkube.demo import DemoError

NS, NAME = "research-demo", "fair-sharing"
CREATED = "2026-12-06T20:00:00Z"
CREATED_TS = 1796587200.0  # CREATED as seconds since the epoch

ANSWERS = "lease broker https://broker.svc:8090 answers: each model call takes a lease of ModelEndpoint offline"


def kept_pod(state_dir: Path, folder: str, mtime: float, lines: list[str]) -> None:
    """A pod's log as the real node keeps it: <kept>/<ns>_<pod>_<uid>/<container>/0.log, CRI format."""
    d = state_dir / "real-nodes" / demo.NODE / "pod-logs-kept" / folder
    (d / "main").mkdir(parents=True)
    (d / "main" / "0.log").write_text("".join(f"2026-12-06T20:00:01Z stdout {tag} {text}\n" for tag, text in lines))
    os.utime(d, (mtime, mtime))


@dataclass(frozen=True)
class Kube(demo.Kube):
    """The demo's kubectl, answering ``get researchjob`` and ``kubectl research logs`` from here."""

    shown: str | None = None  # what the plugin prints; None: it finds no worker pod

    def get(self, *args: str) -> dict[str, Any] | None:
        if args[:2] == ("researchjob", NAME):
            return {"metadata": {"namespace": NS, "name": NAME, "creationTimestamp": CREATED}}
        return None

    def research(self, *args: str, emit: Any = None, timeout: float = 180) -> Any:
        assert args == ("logs", NAME, "-n", NS)
        if self.shown is None:
            raise DemoError(f"no worker pods of researchjob {NS}/{NAME} to show")
        return subprocess.CompletedProcess(["kubectl", "research", *args], 0, self.shown, "")


def test_deleted_pods_of_this_researchjob_are_shown_from_the_nodes_copies_and_no_other_pods(tmp_path: Path) -> None:
    shown = f"==> pod {NAME}-abc123-b1-bbbbb (interview 2, 3) <==\n{ANSWERS}\n"
    kube = Kube(tmp_path / "kubeconfig", tmp_path / "tools", tmp_path, shown)
    after, before = CREATED_TS + 30, CREATED_TS - 600
    kept_pod(tmp_path, f"{NS}_{NAME}-abc123-plan-aaaaa_uid1", after, [("P", ANSWERS[:20]), ("F", ANSWERS[20:])])
    kept_pod(tmp_path, f"{NS}_{NAME}-abc123-b1-bbbbb_uid2", after, [("F", ANSWERS)])  # shown by the plugin
    kept_pod(tmp_path, f"{NS}_{NAME}-2-def456-plan-ccccc_uid3", after, [("F", ANSWERS)])  # ResearchJob fair-sharing-2
    kept_pod(tmp_path, f"{NS}_{NAME}-0a0a0a-write-ddddd_uid4", before, [("F", ANSWERS)])  # an earlier fair-sharing
    kept_pod(tmp_path, f"elsewhere_{NAME}-abc123-plan-eeeee_uid5", after, [("F", ANSWERS)])  # another namespace
    kept_pod(tmp_path, f"{NS}_model-server-xyz_uid6", after, [("F", ANSWERS)])  # not a worker pod

    logs = demo.worker_logs(kube, NS, NAME)

    assert [pod for pod, _, _ in demo.broker_lines(logs)] == [f"{NAME}-abc123-b1-bbbbb", f"{NAME}-abc123-plan-aaaaa"]
    assert f"==> pod {NAME}-abc123-plan-aaaaa (deleted; its log as the node kept it) <==\n{ANSWERS}\n" in logs


def test_without_any_worker_pod_left_or_kept_the_logs_are_empty(tmp_path: Path) -> None:
    kube = Kube(tmp_path / "kubeconfig", tmp_path / "tools", tmp_path)
    assert demo.worker_logs(kube, NS, NAME) == ""
    assert demo.broker_lines(demo.worker_logs(kube, NS, NAME)) == []
