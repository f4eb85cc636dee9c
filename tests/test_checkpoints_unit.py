"""The ConfigMap store's interview checkpoints (research_worker.store.checkpoints): a pod stopped
mid-interview and retried resumes after the last finished step, paying again for at most the call
that was in flight; against the offline model server over HTTP, with the ConfigMaps in memory (the
real API server's part, RBAC included, is tests/test_worker_cluster.py's)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from offline_model.launcher import ModelServerProcess
from research_api.names import ANNOTATION_JOB_UID, CHECKPOINT, LABEL_KIND, configmap_name
from research_api.task import ResearchTask
from research_worker import steps
from research_worker.store.configmaps import ConfigMapStore

CORPUS = Path(__file__).parent / "corpus"
FULL_INTERVIEW = 7  # (question, query, answer) x 2 turns + section


class ConfigMapsInMemory:
    """The worker's three ConfigMap calls, answered as the API server does (404, 409)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.replaced = 0

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[name] = copy.deepcopy(body)
        return body

    def read_namespaced_config_map(self, name: str, namespace: str) -> dict[str, Any]:
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.objects[name])

    def replace_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        self.objects[name] = copy.deepcopy(body)
        self.replaced += 1
        return body


def _task(base_url: str) -> ResearchTask:
    return ResearchTask.model_validate(
        {
            "job": {"namespace": "research", "name": "rj-ckpt", "uid": str(uuid.uuid4())},
            "topic": "How Kubernetes schedules and limits batch workloads",
            "maxAnalysts": 3,
            "maxTurns": 2,
            "interviewConcurrency": 1,
            "model": {"name": "offline-research-1", "baseUrl": base_url, "maxConcurrency": 1},
            "sources": [{"type": "documents", "path": str(CORPUS)}],
            "store": {"type": "configmap"},
        }
    )


def _store(task: ResearchTask, api: ConfigMapsInMemory) -> ConfigMapStore:
    store = ConfigMapStore(task, None)
    store.core = api  # a new pod's store: nothing in memory, everything from the "API server"
    return store


async def test_an_interview_stopped_mid_way_resumes_after_its_last_finished_step(
    modelserver_factory: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    server: ModelServerProcess = modelserver_factory(ttft_ms=100)
    task = _task(server.base_url)
    api = ConfigMapsInMemory()
    rt = await steps.prepare(task)
    await steps.plan(rt, _store(task, api))
    server.reset()

    first = asyncio.create_task(steps.interview(rt, _store(task, api)))
    section_0 = configmap_name(task.job.name, task.plan_id, "section", 0)
    for _ in range(600):  # the first analyst done, the second three calls into its interview
        if section_0 in api.objects and server.stats()["total"] >= FULL_INTERVIEW + 3:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the interview did not get under way")
    first.cancel()  # the pod is gone
    with contextlib.suppress(asyncio.CancelledError):
        await first

    ckpt = api.objects[configmap_name(task.job.name, task.plan_id, CHECKPOINT, 1)]
    assert LABEL_KIND not in ckpt["metadata"]["labels"], "the operator's ConfigMap watch must not see it"
    assert ckpt["metadata"]["annotations"][ANNOTATION_JOB_UID] == task.job.uid
    assert ckpt["metadata"]["ownerReferences"][0]["uid"] == task.job.uid
    assert json.loads(ckpt["data"]["data.json"])["format"] == 1

    caplog.set_level(logging.INFO, logger="research_worker.steps")
    rt2 = await steps.prepare(task)
    outcome = await steps.interview(rt2, _store(task, api))  # the retried pod
    assert (outcome.written, outcome.skipped) == ([1, 2], [0])
    assert "analyst 1: resuming the interview" in caplog.text
    await asyncio.sleep(0.5)  # a call cut off finishes on the server, which counts it
    # Every call once, but at most the one in flight when the pod went: a restarted interview
    # would pay again for the three calls it had made.
    assert 3 * FULL_INTERVIEW <= server.stats()["total"] <= 3 * FULL_INTERVIEW + 1
    sections = {i for i in range(3) if configmap_name(task.job.name, task.plan_id, "section", i) in api.objects}
    assert sections == {0, 1, 2}


async def test_a_predecessors_checkpoint_of_the_same_name_is_not_resumed(modelserver_factory: Any) -> None:
    """A ResearchJob deleted and created again under the same name finds its predecessor's
    checkpoint ConfigMap (still being collected): it starts over and overwrites it."""
    server: ModelServerProcess = modelserver_factory()
    task = _task(server.base_url)
    api = ConfigMapsInMemory()
    name = configmap_name(task.job.name, task.plan_id, CHECKPOINT, 0)
    saver = _store(task, api).checkpointer()
    api.objects[name] = {
        "metadata": {"name": name, "annotations": {ANNOTATION_JOB_UID: "someone-else"}, "labels": {}},
        "data": {"data.json": json.dumps({"format": 1, "checkpoint": ["json", ""], "metadata": ["json", ""]})},
    }
    config: Any = {"configurable": {"thread_id": f"{task.job.uid}:{task.plan_id}:0"}}
    assert await saver.aget_tuple(config) is None
