"""The operator on a shared cluster: reused names, one admission path for every worker Job, quotas
too small to ever fit, and a randomized scenario of creates, deletes, cap and quota changes and
operator kills, with the invariants checked all along. Real control plane, real worker, offline model.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.utils import parse_quantity

from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import RESTRICTED_LABELS, ClusterHandle, drain, quiesce
from tests.fixtures.diagnose import cluster_state
from tests.fixtures.operator import CORPUS, OperatorProcess
from tests.test_operator_cluster import create, researchjob, wait_phase

pytestmark = pytest.mark.cluster

LABEL_JOB = f"{GROUP}/job"
STEP = f"{GROUP}/step"
SMALL = {"count": 2}
ONE_BY_ONE = {"batchSize": 1, "maxActiveJobs": 2}
WORKER = {"resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}
WAIT_CONDITIONS = {"QuotaExceeded", "Throttled", "WorkerPodsBlocked", "AwaitingReview"}


def owner_uid(meta: Any) -> str:
    refs = [r for r in meta.owner_references or [] if r.kind == "ResearchJob"]
    return str(refs[0].uid) if refs else ""


def is_active(job: Any) -> bool:
    conds = {c.type for c in job.status.conditions or [] if c.status == "True"}
    return not (conds & {"Complete", "Failed"}) and not job.spec.suspend


@dataclass
class Ledger:
    """Every worker Job seen cluster-wide (ours by label), and the active ones as each event arrives."""

    active: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, name) -> step
    names: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))  # (rj uid, name) -> uids
    # t, ns, name, active all, active in ns, the active Jobs then
    creations: list[tuple[float, str, str, int, int, tuple[str, ...]]] = field(default_factory=list)
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ClusterJobWatch(threading.Thread):
    """Lists our worker Jobs, then watches from the list's resourceVersion; after each watch ends
    (or expires) it lists again and replaces the active set, so no deletion is ever missed."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(daemon=True)
        self.batch = client.BatchV1Api(api)
        self.ledger = Ledger()
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.seen: set[str] = set()

    def _observe(self, job: Any, gone: bool) -> None:
        meta = job.metadata
        key = (meta.namespace, meta.name)
        self.ledger.names[(owner_uid(meta), meta.name)].add(meta.uid)
        if gone or not is_active(job):
            self.ledger.active.pop(key, None)
        else:
            self.ledger.active[key] = (meta.labels or {}).get(STEP, "")
        if meta.uid not in self.seen and not gone:
            self.seen.add(meta.uid)
            in_ns = sum(1 for ns, _ in self.ledger.active if ns == meta.namespace)
            snapshot = tuple(sorted(f"{ns}/{n}" for ns, n in self.ledger.active))
            self.ledger.creations.append(
                (time.monotonic(), meta.namespace, meta.name, len(self.ledger.active), in_ns, snapshot)
            )
        self.ledger.max_active = max(self.ledger.max_active, len(self.ledger.active))

    def run(self) -> None:
        while not self.stop_flag.is_set():
            listed = self.batch.list_job_for_all_namespaces(label_selector=LABEL_JOB)
            with self.ledger.lock:
                self.ledger.active.clear()
                for job in listed.items:
                    self._observe(job, gone=False)
            self.ready.set()
            w = watch.Watch()
            try:
                for ev in w.stream(
                    self.batch.list_job_for_all_namespaces,
                    label_selector=LABEL_JOB,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=5,
                ):
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        with self.ledger.lock:
                            self._observe(ev["object"], gone=ev["type"] == "DELETED")
                    if self.stop_flag.is_set():
                        break
            except client.ApiException as e:
                if e.status != 410:  # expired: list again
                    raise

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)

    def duplicated_names(self) -> dict[tuple[str, str], set[str]]:
        """Job names created more than once for one ResearchJob uid."""
        with self.ledger.lock:
            return {k: v for k, v in self.ledger.names.items() if len(v) > 1}


@contextmanager
def job_watch(api: client.ApiClient) -> Iterator[ClusterJobWatch]:
    w = ClusterJobWatch(api)
    w.start()
    w.ready.wait(5)
    try:
        yield w
    finally:
        w.stop()


@contextmanager
def namespaces(cluster: ClusterHandle, count: int) -> Iterator[list[str]]:
    """``count`` fresh restricted namespaces with the test corpus, deleted afterwards."""
    core = client.CoreV1Api(cluster.api_client())
    names = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    data = {p.name: p.read_text() for p in sorted(CORPUS.glob("*.md"))}
    for ns in names:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels=RESTRICTED_LABELS)))
        core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})
    for ns in names:
        for _ in range(100):
            if core.list_namespaced_service_account(ns, field_selector="metadata.name=default").items:
                break
            time.sleep(0.1)
    try:
        yield names
    except BaseException:
        print(cluster_state(cluster))  # before the namespaces and what is in them go
        raise
    finally:
        for ns in names:
            core.delete_namespace(ns, propagation_policy="Background")
        drain(cluster.api_client(), names)


@contextmanager
def caps(api: client.ApiClient, operator: OperatorProcess, **values: int) -> Iterator[Any]:
    """The operator's settings ConfigMap with these caps; yields a setter; removed afterwards. The
    caps count every worker Job of the cluster, so first no Job of an earlier test may be running."""
    quiesce(api)
    core = client.CoreV1Api(api)
    ns = operator.env["OPERATOR_NAMESPACE"]
    name = f"caps-{uuid.uuid4().hex[:6]}"

    def put(**v: int) -> None:
        body = {
            "metadata": {"name": name, "labels": {f"{GROUP}/kind": "operator-settings"}},
            "data": {k: str(n) for k, n in v.items()},
        }
        try:
            core.replace_namespaced_config_map(name, ns, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            core.create_namespaced_config_map(ns, body)
        deadline = time.monotonic() + 30
        while not applied(operator.log(), v):
            assert time.monotonic() < deadline, f"the operator never applied {v}"
            time.sleep(0.2)

    put(**values)
    try:
        yield put
    finally:
        try:
            core.delete_namespaced_config_map(name, ns)
        except client.ApiException as e:
            if e.status != 404:
                raise


def applied(log: str, values: dict[str, int]) -> bool:
    """Whether the operator's last settings line shows these values."""
    lines = [ln for ln in log.splitlines() if "operator settings:" in ln]
    return bool(lines) and all(f"{k}={n}" in lines[-1] for k, n in values.items())


def rj(name: str, **spec: Any) -> dict[str, Any]:
    body = researchjob(name, "corpus", analysts=SMALL, parallelism=ONE_BY_ONE, worker=WORKER)
    body["spec"].update(spec)
    return body


def get_rj(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return obj
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def delete_rj(api: client.ApiClient, namespace: str, name: str) -> str | None:
    """Delete a ResearchJob; its uid, or None if there was none."""
    obj = get_rj(api, namespace, name)
    if obj is None:
        return None
    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as e:
        if e.status != 404:
            raise
    return str(obj["metadata"]["uid"])


def wait_gone(api: client.ApiClient, namespace: str, name: str, uid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = get_rj(api, namespace, name)
        if obj is None or obj["metadata"]["uid"] != uid:
            return
        time.sleep(0.2)
    raise AssertionError(f"{namespace}/{name} ({uid}) was never deleted")


def leftovers(api: client.ApiClient, namespaces_: list[str], uids: set[str]) -> list[str]:
    """Objects in these namespaces still owned by one of these (deleted) ResearchJob uids."""
    core, batch, rbac = client.CoreV1Api(api), client.BatchV1Api(api), client.RbacAuthorizationV1Api(api)
    out = []
    for ns in namespaces_:
        for kind, items in (
            ("Job", batch.list_namespaced_job(ns).items),
            ("ConfigMap", core.list_namespaced_config_map(ns).items),
            ("ServiceAccount", core.list_namespaced_service_account(ns).items),
            ("Role", rbac.list_namespaced_role(ns).items),
            ("RoleBinding", rbac.list_namespaced_role_binding(ns).items),
        ):
            out += [f"{kind} {ns}/{o.metadata.name}" for o in items if owner_uid(o.metadata) in uids]
    return out


# ------------------------------------------------------------------------------------------
# names reused across namespaces and across incarnations
# ------------------------------------------------------------------------------------------


def test_reused_names_across_namespaces_and_incarnations_all_succeed_with_their_own_jobs(
    cluster: ClusterHandle, operator: OperatorProcess
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    with namespaces(cluster, 2) as (ns_a, ns_b), job_watch(api) as jobs:
        for ns in (ns_a, ns_b):
            core.create_namespaced_resource_quota(
                ns, {"metadata": {"name": "jobs"}, "spec": {"hard": {"count/jobs.batch": "2"}}}
            )
        # The same name in two namespaces, at the same time.
        for ns in (ns_a, ns_b):
            create(api, ns, rj("twin"))
        for ns in (ns_a, ns_b):
            obj = wait_phase(api, ns, "twin", {"Succeeded", "Failed"})
            assert obj["status"]["phase"] == "Succeeded", obj["status"]
        # One name, five incarnations: each deleted the moment it succeeded (its Jobs and stored
        # objects still being garbage-collected) and created again at once; the first two are
        # deleted mid-run instead.
        uids: set[str] = set()
        for i in range(5):
            create(api, ns_a, rj("phoenix"))
            if i < 2:
                wait_phase(api, ns_a, "phoenix", {"Interviewing", "Writing", "Succeeded"}, timeout=120)
            else:
                obj = wait_phase(api, ns_a, "phoenix", {"Succeeded", "Failed"})
                assert obj["status"]["phase"] == "Succeeded", (i, obj["status"])
                assert obj["status"]["progress"] == "2/2"
            uid = delete_rj(api, ns_a, "phoenix")
            assert uid is not None
            uids.add(uid)
            wait_gone(api, ns_a, "phoenix", uid)
        create(api, ns_a, rj("phoenix"))
        obj = wait_phase(api, ns_a, "phoenix", {"Succeeded", "Failed"})
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        assert obj["metadata"]["uid"] not in uids
        assert not jobs.duplicated_names(), jobs.duplicated_names()
        # Every incarnation had Jobs of its own: no Job name was shared between two uids.
        by_name: dict[tuple[str, str], set[str]] = defaultdict(set)
        with jobs.ledger.lock:
            for (owner, name), _ in jobs.ledger.names.items():
                by_name[("", name)].add(owner)
        shared = {n: o for n, o in by_name.items() if len(o) > 1}
        assert not shared, f"Job names used by two ResearchJobs: {shared}"
        deadline = time.monotonic() + 60
        while (left := leftovers(api, [ns_a], uids)) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, left


# ------------------------------------------------------------------------------------------
# one admission path: caps and quotas bind every step's Job
# ------------------------------------------------------------------------------------------


def test_a_global_cap_of_one_holds_every_step_of_five_researchjobs(
    cluster: ClusterHandle, operator: OperatorProcess
) -> None:
    api = cluster.api_client()
    with namespaces(cluster, 2) as (ns_a, ns_b), caps(api, operator, globalMaxActiveJobs=1), job_watch(api) as jobs:
        names = [(ns_a if i % 2 else ns_b, f"capped-{i}") for i in range(5)]
        for ns, name in names:
            create(api, ns, rj(name, analysts={"count": 1}))
        saw_throttled = False
        deadline = time.monotonic() + 400
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for ns, name in list(pending):
                st = (get_rj(api, ns, name) or {}).get("status") or {}
                conds = {c["type"]: c for c in st.get("conditions") or []}
                if conds.get("Throttled", {}).get("status") == "True":
                    saw_throttled = True
                    assert conds["Throttled"]["reason"] in ("GlobalCap", "FairShare"), conds["Throttled"]
                    assert "globalMaxActiveJobs=1" in conds["Throttled"]["message"]
                if st.get("phase") in ("Succeeded", "Failed"):
                    assert st["phase"] == "Succeeded", (name, st)
                    pending.discard((ns, name))
            time.sleep(0.3)
        assert not pending, f"not finished: {pending}"
        assert jobs.ledger.max_active == 1, f"{jobs.ledger.max_active} worker Jobs were active at once"
        with jobs.ledger.lock:
            created = len(jobs.ledger.creations)
        # Each one's planner goes on to interview its one analyst and write the report (continue_steps).
        assert created >= 5, "each ResearchJob runs at least its planner"
        assert saw_throttled, "no ResearchJob ever said it waited for the global cap"


def test_a_quota_too_small_for_one_worker_pod_says_so_and_never_running(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "tiny"}, "spec": {"hard": {"requests.cpu": "50m", "pods": "10"}}}
    )
    create(api, namespace, rj("starved"))
    deadline = time.monotonic() + 30
    messages: set[str] = set()
    cond: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = (get_rj(api, namespace, "starved") or {}).get("status") or {}
        messages.add(str(st.get("message") or ""))
        cond = next((c for c in st.get("conditions") or [] if c["type"] == "QuotaExceeded"), {})
        if cond.get("status") == "True":
            break
        time.sleep(0.3)
    assert cond.get("status") == "True", f"no QuotaExceeded condition within 30 s: {messages}"
    assert cond["reason"] == "QuotaTooSmall"
    assert "tiny" in cond["message"] and "requests.cpu" in cond["message"] and "50m" in cond["message"]
    assert "100m" in cond["message"], cond["message"]
    time.sleep(3)  # a few more passes: nothing may claim to run
    messages.add(str(((get_rj(api, namespace, "starved") or {}).get("status") or {}).get("message") or ""))
    assert not any("running" in m for m in messages), messages
    assert not client.BatchV1Api(api).list_namespaced_job(namespace).items, "a Job was created that cannot run"
    events = core.list_namespaced_event(namespace, field_selector="reason=QuotaTooSmall").items
    assert len(events) == 1 and events[0].type == "Warning", [(e.reason, e.count) for e in events]
    # Raising the quota lets it run to the end.
    core.patch_namespaced_resource_quota("tiny", namespace, {"spec": {"hard": {"requests.cpu": "1"}}})
    obj = wait_phase(api, namespace, "starved", {"Succeeded", "Failed"})
    assert obj["status"]["phase"] == "Succeeded", obj["status"]


# ------------------------------------------------------------------------------------------
# a randomized scenario with a fixed seed
# ------------------------------------------------------------------------------------------

POD_NEEDS = {
    "count/jobs.batch": Decimal(1),
    "pods": Decimal(1),
    "requests.cpu": Decimal("0.1"),
    "requests.memory": Decimal(128 * 1024 * 1024),
}
QUOTA_SHAPES: list[dict[str, str]] = [
    {"count/jobs.batch": "1"},
    {"count/jobs.batch": "3"},
    {"pods": "2"},
    {"requests.cpu": "250m"},
    {"requests.memory": "300Mi"},
    {"pods": "4", "requests.cpu": "300m", "requests.memory": "1Gi"},
]


def capacity(hard: dict[str, str]) -> int:
    """Worker Jobs that a quota of this shape can run at once."""
    return min(
        (math.floor(Decimal(parse_quantity(v)) / POD_NEEDS[k]) for k, v in hard.items() if k in POD_NEEDS),
        default=10**6,
    )


@dataclass
class History:
    """What was in force when, so a creation is judged against the limits of its moment (a change
    takes the operator a moment to see, so the looser of the old and new value holds for a grace)."""

    grace: float = 5.0
    caps: list[tuple[float, int]] = field(default_factory=lambda: [(0.0, 0)])
    quotas: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    @staticmethod
    def _allowed(changes: list[tuple[float, int]], t: float, grace: float) -> int:
        """The loosest value in force during [t - grace, t] (0 means no limit)."""
        values = [v for when, v in changes if t - grace <= when <= t]
        before = [v for when, v in changes if when < t - grace]
        values += before[-1:]
        unlimited = 10**6
        return max((v or unlimited) for v in values) if values else unlimited

    def cap(self, t: float) -> int:
        return self._allowed(self.caps, t, self.grace)

    def quota(self, ns: str, t: float) -> int:
        return self._allowed(self.quotas.get(ns, [(0.0, 0)]), t, self.grace)


def remove_quota(core: client.CoreV1Api, ns: str) -> None:
    try:
        core.delete_namespaced_resource_quota("scenario", ns)
    except client.ApiException as e:
        if e.status != 404:
            raise


def test_random_creates_deletes_caps_quotas_and_operator_kills_keep_every_invariant(
    cluster: ClusterHandle, operator: OperatorProcess
) -> None:
    rng = random.Random(20261201)
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    pool = ["ana", "ben", "cy"]
    hist = History()
    deleted_uids: set[str] = set()
    with namespaces(cluster, 3) as nss, caps(api, operator, globalMaxActiveJobs=0) as set_caps, job_watch(api) as jobs:
        start = time.monotonic()
        actions: list[str] = []  # what the scenario did and when, printed if an invariant breaks
        for _ in range(30):
            action = rng.choice(
                ["create", "create", "create", "delete", "recreate", "caps", "quota", "unquota", "kill"]
            )
            ns, name = rng.choice(nss), rng.choice(pool)
            actions.append(f"{time.monotonic() - start:6.1f} {action} {ns}/{name}")
            if action == "create" and get_rj(api, ns, name) is None:
                create(api, ns, rj(name))
            elif action in ("delete", "recreate"):
                uid = delete_rj(api, ns, name)
                if uid:
                    deleted_uids.add(uid)
                    if action == "recreate":
                        wait_gone(api, ns, name, uid)
                        create(api, ns, rj(name))
            elif action == "caps":
                cap = rng.choice([0, 1, 2, 3])
                hist.caps.append((time.monotonic(), cap))
                actions[-1] += f" globalMaxActiveJobs={cap}"
                set_caps(globalMaxActiveJobs=cap)
                hist.caps.append((time.monotonic(), cap))
            elif action == "quota":
                shape = rng.choice(QUOTA_SHAPES)
                actions[-1] += f" {shape}"
                hist.quotas.setdefault(ns, [(0.0, 0)]).append((time.monotonic(), capacity(shape)))
                try:
                    core.replace_namespaced_resource_quota(
                        "scenario", ns, {"metadata": {"name": "scenario"}, "spec": {"hard": shape}}
                    )
                except client.ApiException as e:
                    if e.status != 404:
                        raise
                    core.create_namespaced_resource_quota(
                        ns, {"metadata": {"name": "scenario"}, "spec": {"hard": shape}}
                    )
            elif action == "unquota":
                hist.quotas.setdefault(ns, [(0.0, 0)]).append((time.monotonic(), 0))
                remove_quota(core, ns)
            elif action == "kill":
                operator.kill(signal.SIGKILL)
                time.sleep(rng.uniform(0.0, 1.0))
                operator.start()
            time.sleep(rng.uniform(0.5, 2.5))

        # Every ResearchJob left ends terminal or says in a condition why it waits.
        deadline = time.monotonic() + 240
        undecided: dict[str, Any] = {}
        while time.monotonic() < deadline:
            undecided = {}
            for ns in nss:
                for obj in client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
                    "items"
                ]:
                    st = obj.get("status") or {}
                    waits = [c["type"] for c in st.get("conditions") or [] if c["type"] in WAIT_CONDITIONS]
                    true_waits = [
                        c for c in st.get("conditions") or [] if c["type"] in WAIT_CONDITIONS and c["status"] == "True"
                    ]
                    if st.get("phase") not in ("Succeeded", "Failed") and not true_waits:
                        undecided[f"{ns}/{obj['metadata']['name']}"] = (st.get("phase"), st.get("message"), waits)
            if not undecided:
                break
            time.sleep(1)
        assert not undecided, f"neither finished nor saying why they wait: {undecided}"

        # Then lift every limit: everything left succeeds.
        hist.caps.append((time.monotonic(), 0))  # before: the operator may act on it before put returns
        set_caps(globalMaxActiveJobs=0)
        for ns in nss:
            hist.quotas.setdefault(ns, [(0.0, 0)]).append((time.monotonic(), 0))
            remove_quota(core, ns)
        for ns in nss:
            for obj in client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
                done = wait_phase(api, ns, obj["metadata"]["name"], {"Succeeded", "Failed"}, timeout=300)
                assert done["status"]["phase"] == "Succeeded", done["status"]

        # Never more active worker Jobs than the caps and quotas allowed when each was created.
        with jobs.ledger.lock:
            creations = list(jobs.ledger.creations)
        assert len(creations) > 10, "the scenario hardly ran anything"
        over = [
            (round(t - start, 1), ns, name, active, in_ns, hist.cap(t), hist.quota(ns, t), snapshot)
            for t, ns, name, active, in_ns, snapshot in creations
            if active > hist.cap(t) or in_ns > hist.quota(ns, t)
        ]
        timeline = "\n".join(actions)
        assert not over, (
            f"Jobs created beyond a cap or quota (t, ns, name, active, in ns, cap, quota, active Jobs): {over}\n"
            f"the scenario:\n{timeline}"
        )
        assert not jobs.duplicated_names(), jobs.duplicated_names()
        # Nothing of a deleted ResearchJob is left behind.
        deadline = time.monotonic() + 60
        while (left := leftovers(api, nss, deleted_uids)) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, left
