"""The admission scheduler (``actions.admit.Scheduler``) without a cluster: the API calls are faked,
the world is a fresh ``World``. What a user would notice: which ResearchJob gets a freed slot,
which ones are woken, what was created, and what each waiting one is told."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest

from research_api.researchjob import ResearchJobSpec
from research_api.task import Step
from research_operator.actions import admit as admit_mod
from research_operator.actions import kube
from research_operator.cache import world as world_mod
from research_operator.cache.world import World
from research_operator.constants import plan_id
from research_operator.decisions.admission import WaitReason
from research_operator.decisions.manifests import Owner, worker_job, worker_job_and_task
from research_operator.settings import Settings

PID = plan_id(None)


def spec(analysts: int = 2) -> ResearchJobSpec:
    return ResearchJobSpec.model_validate(
        {
            "topic": "How glaciers move",
            "analysts": {"count": analysts},
            "parallelism": {"batchSize": 2, "maxActiveJobs": 1},
            "sources": [{"type": "documents", "configMap": "corpus"}],
        }
    )


@pytest.fixture
def world(monkeypatch: Any) -> tuple[World, list[str], Settings]:
    w = World()
    monkeypatch.setattr(world_mod, "WORLD", w)
    monkeypatch.setattr(admit_mod, "WORLD", w)
    monkeypatch.setattr(admit_mod, "SCHEDULER", admit_mod.Scheduler())
    created: list[str] = []

    async def create(obj: dict[str, Any], terminating: Any = None) -> tuple[kube.Created, str]:
        created.append(obj["metadata"]["name"])
        return kube.Created.CREATED, ""

    monkeypatch.setattr(kube, "create", create)
    cfg = Settings(namespace="ops", global_max_active=2, worker_service_account="worker")
    monkeypatch.setattr(admit_mod, "settings", lambda: cfg)
    w.attach({}, {}, {})
    return w, created, cfg


async def post(w: World, cfg: Settings, namespace: str, name: str) -> tuple[admit_mod.Waiting, int]:
    key = (namespace, f"uid-{name}")
    owner = Owner(namespace, name, f"uid-{name}")
    w.bodies[key] = {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}}
    w.event(key)
    job = worker_job(owner, spec(), cfg, PID, Step.PLAN)
    return await admit_mod.admit_and_create(key, owner, admit_mod.Want("plan", [job], 1), spec().worker, cfg)


def finish(w: World, key: tuple[str, str]) -> None:
    """The watch shows the ResearchJob's Jobs done."""
    index = dict(w.job_index or {})
    index[key] = [replace(j, succeeded=True) for j in w.jobs_of(key).values()]
    w.attach(index, {}, {})
    w.created.pop(key, None)
    w.bump()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.02)


async def test_a_freed_slot_goes_to_the_namespace_below_its_share_and_wakes_only_that_owner(
    world: tuple[World, list[str], Settings],
) -> None:
    """A cap of 2 held by a big tenant with a third ResearchJob waiting; a small tenant's one comes
    later. When one of the big tenant's Jobs ends, the small tenant's ResearchJob gets the slot: its
    Job is created by the scheduler and only its owner is woken; the big tenant's backlog sleeps on,
    still told why it waits."""
    w, created, cfg = world
    for name in ("big-1", "big-2"):
        waiting, n = await post(w, cfg, "big", name)
        assert n == 1 and waiting.reason is None
    waiting, n = await post(w, cfg, "big", "big-3")
    assert n == 0 and waiting.reason == WaitReason.GLOBAL_CAP
    waiting, n = await post(w, cfg, "small", "small-1")
    assert n == 0 and waiting.reason == WaitReason.GLOBAL_CAP
    assert len(created) == 2
    for key in list(w.wakeups):
        w.wakeups[key].clear()
    w.dirty.clear()

    finish(w, ("big", "uid-big-1"))
    w.wake_waiting(None)
    await settle()

    assert len(created) == 3 and created[2].startswith("small-1-")
    assert w.wakeups[("small", "uid-small-1")].is_set(), "the owner of what was admitted is woken"
    assert not w.wakeups[("big", "uid-big-3")].is_set(), "a waiter a freed slot cannot help sleeps on"
    assert w.waiting.get(("big", "uid-big-3")) == 1 and w.waiting.get(("small", "uid-small-1")) == 0
    assert [j.name for j in w.jobs_of(("small", "uid-small-1")).values()] == [created[2]]


async def test_posts_that_arrive_together_are_decided_in_fair_order_not_arrival_order(
    world: tuple[World, list[str], Settings],
) -> None:
    """A cap of 2, one slot held by the big tenant; a burst of posts in one moment: two more of the
    big tenant's, then one of a small tenant's. The small tenant, holding nothing, is decided first
    and gets the free slot although it asked last."""
    w, created, cfg = world
    await post(w, cfg, "big", "big-1")
    results = await asyncio.gather(
        post(w, cfg, "big", "big-2"), post(w, cfg, "big", "big-3"), post(w, cfg, "small", "s")
    )
    assert [n for _, n in results] == [0, 0, 1]
    assert results[0][0].reason == WaitReason.GLOBAL_CAP
    assert created[-1].startswith("s-")


async def test_a_waiter_queued_with_other_settings_is_woken_to_build_its_jobs_anew(
    world: tuple[World, list[str], Settings], monkeypatch: Any
) -> None:
    """Settings changed while it waited (its manifests were built with the old ones): the scheduler
    creates nothing from them and wakes its owner, whose pass builds and posts them again."""
    w, created, cfg = world
    await post(w, cfg, "a", "one")
    await post(w, cfg, "a", "two")
    waiting, n = await post(w, cfg, "a", "three")
    assert n == 0
    newer = replace(cfg, global_max_active=3)
    monkeypatch.setattr(admit_mod, "settings", lambda: newer)
    w.wakeups[("a", "uid-three")].clear()
    w.wake_waiting(None)
    await settle()
    assert len(created) == 2, "nothing is created from manifests built with the old settings"
    assert w.wakeups[("a", "uid-three")].is_set() and ("a", "uid-three") in w.dirty


async def test_a_slot_freed_while_the_admitted_jobs_are_still_being_created_is_not_missed(
    world: tuple[World, list[str], Settings], monkeypatch: Any
) -> None:
    """A ResearchJob admitted one Job of three (cap 2, one slot held elsewhere), whose create is slow;
    the other Job ends meanwhile. The freed slot goes to the waiting rest at once, not at the resync."""
    w, created, cfg = world
    await post(w, cfg, "other", "x")
    gate = asyncio.Event()
    fast = kube.create

    async def slow_first(obj: dict[str, Any], terminating: Any = None) -> tuple[kube.Created, str]:
        if obj["metadata"]["name"].endswith("-b0"):
            await gate.wait()
        return await fast(obj, terminating)

    monkeypatch.setattr(kube, "create", slow_first)
    key, owner = ("a", "uid-a"), Owner("a", "a", "uid-a")
    w.bodies[key] = {"metadata": {"name": "a", "namespace": "a", "uid": "uid-a"}}
    w.event(key)
    s = spec(3)
    jobs = [worker_job(owner, s, cfg, PID, Step.INTERVIEW, [i], i) for i in range(3)]
    answer = asyncio.ensure_future(
        admit_mod.admit_and_create(key, owner, admit_mod.Want("interview", jobs, 3, [1, 1, 1]), s.worker, cfg)
    )
    await settle()
    assert not answer.done() and w.waiting[key] == 2
    finish(w, ("other", "uid-x"))
    w.wake_waiting(None)
    await settle()
    assert w.waiting[key] == 1, "the freed slot went to the waiting Jobs while the first was being created"
    gate.set()
    waiting, n = await answer
    assert n == 1 and waiting.reason == WaitReason.GLOBAL_CAP
    names = [j["metadata"]["name"] for j in jobs]
    assert names[0] in created and names[1] in created and names[2] not in created


async def test_a_cycle_that_fails_answers_the_passes_it_was_deciding_with_the_error(
    world: tuple[World, list[str], Settings], monkeypatch: Any
) -> None:
    """A bug in a cycle must not leave a pass waiting forever for its answer (its loop would never
    run again): the pass gets the error and retries; the next cycle works."""
    w, created, cfg = world

    def broken(reqs: list[Any]) -> list[Any]:
        raise KeyError("a bug in the ordering")

    works = admit_mod.fair_order
    monkeypatch.setattr(admit_mod, "fair_order", broken)
    with pytest.raises(RuntimeError, match="the admission cycle failed"):
        await asyncio.wait_for(post(w, cfg, "a", "one"), 5)
    monkeypatch.setattr(admit_mod, "fair_order", works)
    waiting, n = await asyncio.wait_for(post(w, cfg, "a", "one"), 5)
    assert n == 1 and waiting.reason is None


def test_what_waits_is_queued_compactly_and_created_as_it_was_built() -> None:
    """A waiting step's Jobs are kept serialized in the queue (thousands of waiting ResearchJobs hold
    them) and come back exactly as built, tasks included."""
    cfg = Settings(namespace="ops")
    owner = Owner("a", "a", "uid-a")
    built = [worker_job_and_task(owner, spec(3), cfg, PID, Step.INTERVIEW, [i], i) for i in range(3)]
    want = admit_mod.Want("interview", [j for j, _ in built], 3, [1, 1, 1], [t for _, t in built])
    queued = want.packed_for_queue()
    assert queued.jobs == [] and queued.tasks is None
    assert len(queued.packed) * 4 < len(json.dumps(want.jobs))
    back = queued.unpacked()
    assert back.jobs == want.jobs and back.tasks == want.tasks and back.analysts == [1, 1, 1]
    assert back.after(1).jobs == want.jobs[1:] and back.after(1).tasks == want.tasks[1:]  # type: ignore[index]
