"""Pure builders of the objects a ResearchJob owns: worker Jobs and the workers' RBAC.

Every child has a deterministic name (``research_api.names.child_name``) and a controller
ownerReference to the ResearchJob, so a repeated create is a 409 and deleting the ResearchJob
garbage-collects everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from research_api.environment import API_KEY_ENV, DSN_ENV, TASK_ENV, TAVILY_KEY_ENV
from research_api.exitcodes import EXIT_CONFIG, NON_RETRYABLE_EXIT_CODES
from research_api.leases import (
    TOKEN_AUDIENCE,
    TOKEN_DIR,
    TOKEN_EXPIRATION_SECONDS,
    TOKEN_FILE,
    TOKEN_VOLUME,
    gateway_url,
)
from research_api.names import REPORT_CLAIM, checkpoint_configmap_names, configmap_name, plan_configmap_names
from research_api.researchjob import (
    GROUP,
    KIND,
    VERSION,
    ResearchJobSpec,
    SecretKeyRef,
    SourceType,
    StoreType,
    WorkerSpec,
)
from research_api.task import (
    Budget,
    ConfigMapStoreSettings,
    DocumentsSource,
    JobRef,
    ModelSettings,
    PostgresStoreSettings,
    QualityFloor,
    ResearchTask,
    Step,
    StructuredOutput,
    TavilySource,
    WikipediaSource,
)
from research_operator.constants import (
    ANNOTATION_CLEANUP_OF,
    ANNOTATION_CLEANUP_OF_UID,
    LABEL_BATCH,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_PLAN,
    LABEL_STEP,
    MANAGED_BY,
    WORKER_UID,
    child_name,
)
from research_operator.decisions import kueue
from research_operator.decisions.endpoints import set_task, share_configmap_name
from research_operator.settings import Settings


@dataclass(frozen=True)
class Owner:
    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def build_task(
    owner: Owner,
    spec: ResearchJobSpec,
    settings: Settings,
    step: Step,
    plan: str,
    analysts: list[int] | None = None,
    continue_steps: bool = False,
) -> ResearchTask:
    """The typed task a worker Job runs: the spec translated, secrets only named by env var."""
    sources: list[DocumentsSource | TavilySource | WikipediaSource] = []
    for s in spec.sources:
        if s.type == SourceType.documents:
            sources.append(DocumentsSource(config_map=s.config_map, top_k=s.max_results))
        elif s.type == SourceType.tavily:
            sources.append(TavilySource(max_results=s.max_results, api_key_env=TAVILY_KEY_ENV))
        else:
            sources.append(WikipediaSource(max_docs=min(s.max_results, 10)))
    store = (
        # markers: the worker also writes small ConfigMaps after each commit, the operator's view of progress
        PostgresStoreSettings(dsn_env=DSN_ENV, markers=True)
        if spec.store.type == StoreType.postgres
        else ConfigMapStoreSettings()
    )
    return ResearchTask(
        job=JobRef(namespace=owner.namespace, name=owner.name, uid=owner.uid),
        step=step,
        topic=spec.topic,
        max_analysts=spec.analysts.count,
        feedback=spec.analysts.feedback,
        plan=plan,
        analysts=analysts or [],
        continue_steps=continue_steps,
        max_turns=spec.interview.max_turns,
        model=ModelSettings(
            name=spec.model.name,
            # A ModelEndpoint named by the ResearchJob is called through the lease broker's gateway,
            # which adds the key only the operator reads (tenancy.endpoint_refusal: the broker is on).
            base_url=(
                gateway_url(settings.lease_broker_url, spec.model.endpoint)
                if spec.model.endpoint
                else spec.model.base_url or settings.default_model_base_url
            ),
            gateway=bool(spec.model.endpoint),
            broker_ca=settings.lease_broker_ca or None,
            temperature=spec.model.temperature,
            max_concurrency=spec.model.max_concurrency,
            requests_per_second=spec.model.requests_per_second,
            api_key_env=API_KEY_ENV,
            timeout_seconds=float(spec.model.timeout_seconds),
            max_output_tokens=spec.model.max_output_tokens,
            structured_output=StructuredOutput(spec.model.structured_output.value),
        ),
        sources=sources,
        store=store,
        budget=Budget(max_tokens=spec.budget.max_tokens),
        quality=quality_floor(spec, settings),
    )


def quality_floor(spec: ResearchJobSpec, settings: Settings) -> QualityFloor:
    """The report quality floor of a ResearchJob: its spec.quality, unset fields the admins' default."""
    own = QualityFloor(min_citation_accuracy=spec.quality.min_citation_accuracy, min_coverage=spec.quality.min_coverage)
    return own.over(settings.quality_floor)


def labels(owner: Owner, step: str | None = None, plan: str | None = None) -> dict[str, str]:
    out = {LABEL_JOB: owner.name, LABEL_MANAGED_BY: MANAGED_BY}
    if step:
        out[LABEL_STEP] = step
    if plan:
        out[LABEL_PLAN] = plan
    return out


def job_name(owner: Owner, plan: str, step: str, batch: int | None = None) -> str:
    return child_name(owner.name, plan, step if batch is None else f"b{batch}")


def worker_service_account(owner: Owner, settings: Settings) -> str:
    return settings.worker_service_account or worker_rbac_name(owner)


def worker_rbac_name(owner: Owner) -> str:
    """The worker ServiceAccount, Role and RoleBinding of one ResearchJob: named after its uid too,
    so one created again under the same name never meets its predecessor's, still being collected."""
    return child_name(owner.name, "worker", owner.uid[:8])


def worker_configmaps(owner: Owner, spec: ResearchJobSpec, plan: str) -> list[str]:
    """Every ConfigMap a worker of this plan reads: what the plan's workers store, the endpoint
    shares the operator writes for them and the documents the spec names."""
    documents = [s.config_map for s in spec.sources if s.config_map]
    stored = plan_configmap_names(owner.name, plan, spec.analysts.count)
    claim = configmap_name(owner.name, plan, REPORT_CLAIM)
    return sorted({*stored, claim, share_configmap_name(owner.name), *documents})


def worker_rbac(owner: Owner, spec: ResearchJobSpec, plan: str) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding for one ResearchJob's worker pods (least privilege): in
    the job's namespace, ``get`` on exactly the ConfigMaps of this plan (``worker_configmaps``; no
    ``list``, so a worker never sees another ResearchJob's), ``create`` of ConfigMaps (a create
    reads nothing; each name is deterministic, so a repeat is a 409), ``get`` and ``update`` of its
    interviews' checkpoints (one ConfigMap per analyst, ``checkpoint_configmap_names``) and ``get``
    of its own ResearchJob. A new plan (feedback) gets the Role replaced with that plan's names."""
    name = worker_rbac_name(owner)
    meta = {"name": name, "namespace": owner.namespace, "labels": labels(owner), "ownerReferences": [owner.reference()]}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": True},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": worker_configmaps(owner, spec, plan),
                    "verbs": ["get"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": checkpoint_configmap_names(owner.name, plan, spec.analysts.count),
                    "verbs": ["get", "update"],
                },
                {"apiGroups": [GROUP], "resources": ["researchjobs"], "resourceNames": [owner.name], "verbs": ["get"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    ]


def worker_network_policy(owner: Owner, egress: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The NetworkPolicy of one ResearchJob's worker pods: nothing may connect to them (they serve
    nothing), and they may connect only where ``egress`` allows (the chart's rules: DNS, the lease
    broker and the bundled model server, plus what admins add: the API server, model endpoints,
    search). Owned by the ResearchJob, named like its worker RBAC."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": worker_rbac_name(owner),
            "namespace": owner.namespace,
            "labels": labels(owner),
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: owner.name, LABEL_MANAGED_BY: MANAGED_BY}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [dict(rule) for rule in egress],
        },
    }


RESTRICTED_POD_SC = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER_SC = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def worker_job(
    owner: Owner,
    spec: ResearchJobSpec,
    settings: Settings,
    plan: str,
    step: Step,
    batch: list[int] | None = None,
    batch_index: int | None = None,
    active_deadline_seconds: int | None = None,
    continue_steps: bool = False,
) -> dict[str, Any]:
    """The batch/v1 Job that runs one worker step (plan, one interview batch, or write).
    ``continue_steps``: its pod goes on with the next steps when it can (``ResearchTask``); a
    planner then interviews ``batch``, which its ``batch`` label names."""
    return worker_job_and_task(
        owner, spec, settings, plan, step, batch, batch_index, active_deadline_seconds, continue_steps
    )[0]


def worker_job_and_task(
    owner: Owner,
    spec: ResearchJobSpec,
    settings: Settings,
    plan: str,
    step: Step,
    batch: list[int] | None = None,
    batch_index: int | None = None,
    active_deadline_seconds: int | None = None,
    continue_steps: bool = False,
) -> tuple[dict[str, Any], ResearchTask]:
    """``worker_job`` and the task written into it, which admission changes (``endpoints.stamp``,
    ``with_traceparent``) without reading the Job's JSON back."""
    task = build_task(owner, spec, settings, step, plan, batch, continue_steps)
    env: list[dict[str, Any]] = [{"name": TASK_ENV, "value": task.to_json()}]
    if spec.model.api_key_secret_ref is not None:
        env.append(_secret_env(API_KEY_ENV, spec.model.api_key_secret_ref))
    if spec.store.dsn_secret_ref is not None:
        env.append(_secret_env(DSN_ENV, spec.store.dsn_secret_ref))
    for source in spec.sources:
        if source.api_key_secret_ref is not None and source.type.value == "tavily":
            env.append(_secret_env(TAVILY_KEY_ENV, source.api_key_secret_ref))
    env.extend({"name": k, "value": v} for k, v in settings.worker_tracing_env)
    job_labels = labels(owner, step.value, plan)
    if batch_index is not None:  # a planner's: the batch it interviews after planning
        job_labels[LABEL_BATCH] = str(batch_index)
    # Kueue mode: every step's Job waits suspended in the LocalQueue until Kueue admits it. The
    # Kueue labels go on the Job only (Kueue reads them there), not on its pods.
    kueue_labels = kueue.job_labels(settings, spec.priority)
    suspend = bool(kueue_labels)
    resources = spec.worker.resources.wire()
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": worker_service_account(owner, settings),
        "automountServiceAccountToken": True,
        "securityContext": RESTRICTED_POD_SC,
        "containers": [
            {
                "name": "worker",
                "image": settings.worker_image,
                "command": ["research-worker", step.value],
                "env": env,
                "resources": resources,
                "securityContext": RESTRICTED_CONTAINER_SC,
                # The worker's last error line becomes the pod's termination message, which the
                # operator quotes in the ResearchJob's status when a step fails.
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
    }
    if spec.worker.node_selector:
        pod_spec["nodeSelector"] = dict(spec.worker.node_selector)
    if spec.worker.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in spec.worker.tolerations]
    if spec.worker.priority_class_name:
        pod_spec["priorityClassName"] = spec.worker.priority_class_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.retries.backoff_limit,
        # Retrying cannot fix a bad task (2), a rejected key or unknown model (3) or an exhausted
        # token budget (5): fail the Job at once instead of spending the backoff on it.
        "podFailurePolicy": {
            "rules": [
                # A pod evicted or preempted (drain, priority) did nothing wrong: retry it for free.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "worker",
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
            ]
        },
        "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
    }
    pod_spec["volumes"] = [{"name": "tmp", "emptyDir": {}}]  # the root filesystem is read-only
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    if suspend:
        job_spec["suspend"] = True
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, active_deadline_seconds)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(owner, plan, step.value, batch_index if step == Step.INTERVIEW else None),
            "namespace": owner.namespace,
            "labels": {**job_labels, **kueue_labels},
            "ownerReferences": [owner.reference()],
        },
        "spec": job_spec,
    }
    # The gateway knows the pod by the same token as the leases.
    return (add_lease_broker_token(job) if task.model.gateway else job), task


def with_traceparent(job: dict[str, Any], task: ResearchTask, traceparent: str) -> ResearchTask:
    """The worker Job's task (as admission left it) with its ``traceparent`` set, written into the
    Job: the span that admitted it, which the worker's spans continue (research_api.tracing)."""
    task = task.model_copy(update={"traceparent": traceparent})
    set_task(job, task)
    return task


def add_lease_broker_token(job: dict[str, Any]) -> dict[str, Any]:
    """Give a worker Job's pod its token for the lease broker: a projected ServiceAccount token bound
    to the broker's audience (and to the pod), rotated by the kubelet, mounted read-only. The broker
    accepts only such tokens, so the pod's API token never travels to it. Projected volumes are
    allowed under restricted Pod Security. Idempotent."""
    pod_spec = job["spec"]["template"]["spec"]
    volumes = pod_spec.setdefault("volumes", [])
    if any(v.get("name") == TOKEN_VOLUME for v in volumes):
        return job
    volumes.append(
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                            "path": TOKEN_FILE,
                        }
                    }
                ]
            },
        }
    )
    container = pod_spec["containers"][0]
    container.setdefault("volumeMounts", []).append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    return job


CLEANUP_BACKOFF_LIMIT = 3
CLEANUP_DEADLINE_SECONDS = 600  # also ends a pod that cannot start (a missing DSN Secret)


def cleanup_job_name(owner: Owner) -> str:
    return child_name(owner.name, "cleanup")


def cleanup_job(
    owner: Owner, dsn: SecretKeyRef, settings: Settings, worker: WorkerSpec | None = None, owned: bool = True
) -> dict[str, Any]:
    """The Job that deletes a deleted ResearchJob's PostgreSQL rows (``research-worker cleanup``).

    It needs only the DSN (from the job's Secret, like every worker Job), not the Kubernetes API:
    the namespace's default ServiceAccount with no token mounted. Owned by the ResearchJob, so it
    is garbage-collected with it; ``owned=False`` during a foreground deletion, which would delete
    an owned Job at once (the operator deletes it itself, and finds it by its annotation)."""
    worker = worker or WorkerSpec()
    job_labels = labels(owner, Step.CLEANUP.value)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": RESTRICTED_POD_SC,
        "containers": [
            {
                "name": "worker",
                "image": settings.worker_image,
                "command": ["research-worker", Step.CLEANUP.value, "--job-uid", owner.uid],
                "env": [_secret_env(DSN_ENV, dsn)],
                "resources": worker.resources.wire(),
                "securityContext": RESTRICTED_CONTAINER_SC,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if worker.node_selector:
        pod_spec["nodeSelector"] = dict(worker.node_selector)
    if worker.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in worker.tolerations]
    if worker.priority_class_name:
        pod_spec["priorityClassName"] = worker.priority_class_name
    metadata: dict[str, Any] = {
        "name": cleanup_job_name(owner),
        "namespace": owner.namespace,
        "labels": job_labels,
        "annotations": {ANNOTATION_CLEANUP_OF: owner.name, ANNOTATION_CLEANUP_OF_UID: owner.uid},
    }
    if owned:
        metadata["ownerReferences"] = [owner.reference()]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": CLEANUP_BACKOFF_LIMIT,
            "activeDeadlineSeconds": CLEANUP_DEADLINE_SECONDS,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "worker", "operator": "In", "values": [EXIT_CONFIG]},
                    }
                ]
            },
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
        },
    }


def broker_endpoint_slice(namespace: str, service: str, service_uid: str, ip: str, port: int) -> dict[str, Any]:
    """The lease broker Service's one EndpointSlice: ``ip:port`` (the leader pod). Labelled as
    managed by the operator, so the EndpointSlice controller leaves it alone, and owned by the
    Service, so the garbage collector deletes it with the Service (``helm uninstall``)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": service,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": service_uid}],
        },
        "addressType": "IPv6" if ":" in ip else "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"name": "leases", "port": port, "protocol": "TCP"}],
    }
