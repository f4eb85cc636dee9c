"""The ConfigMap store: one ConfigMap per object, owned by the ResearchJob, with deterministic names
and labels (research_api.names), the record as JSON under ``data.json`` (research_api.records)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from research_api.names import (
    ANNOTATION_JOB_UID,
    CHECKPOINT,
    CONFIGMAP_DATA_KEY,
    CONFIGMAP_DATA_LIMIT,
    CONFIGMAP_REPORT_KEY,
    LABEL_ANALYST,
    LABEL_JOB,
    LABEL_KIND,
    LABEL_PLAN,
    REPORT_CLAIM,
    configmap_name,
    label_value,
    plan_configmap_names,
)
from research_api.records import AnalystPlan, Report, Section, StoredKind, TokenUsage
from research_api.task import ResearchTask
from research_worker.errors import ObjectTooLarge, StoreError
from research_worker.store.base import usage_of_results
from research_worker.store.checkpoints import ConfigMapCheckpointer
from research_worker.store.kube import ConfigMaps

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def configmap_body(
    name: str,
    namespace: str,
    data: Mapping[str, str],
    labels: dict[str, str],
    owner: dict[str, Any],
    uid: str,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ConfigMap manifest, refused (never truncated) if its data would exceed 1 MiB."""
    size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    if size > CONFIGMAP_DATA_LIMIT:
        raise ObjectTooLarge(
            f"ConfigMap {namespace}/{name} would hold {size} bytes, more than the "
            f"{CONFIGMAP_DATA_LIMIT} bytes a ConfigMap may hold; use the postgres store for results this large"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_JOB_UID: uid, **(annotations or {})},
            "ownerReferences": [owner],
        },
        "data": dict(data),
    }


class PlanConfigMaps:
    """The ConfigMaps of one ResearchJob's plan: deterministic names, labels, ownerReference. The
    ConfigMap store and the PostgreSQL store's markers both write through it."""

    def __init__(self, task: ResearchTask, api_client: Any) -> None:
        self.core: Any = ConfigMaps(api_client)
        self.ns = task.job.namespace
        self.job = task.job.name
        self.uid = task.job.uid
        self.plan = task.plan_id
        self.owner = task.job.owner_reference()
        self.base_labels = {LABEL_JOB: label_value(self.job), LABEL_PLAN: self.plan}
        self.max_analysts = task.max_analysts

    def _name(self, kind: StoredKind, index: int | None = None) -> str:
        return configmap_name(self.job, self.plan, kind, index)

    async def _create(
        self,
        kind: StoredKind,
        obj: BaseModel,
        index: int | None = None,
        extra: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> bool:
        labels = {**self.base_labels, LABEL_KIND: kind.value}
        if index is not None:
            labels[LABEL_ANALYST] = str(index)
        name = self._name(kind, index)
        data = {CONFIGMAP_DATA_KEY: obj.model_dump_json(), **(extra or {})}
        return await self._create_once(str(kind), name, data, labels, annotations)

    async def _create_once(
        self,
        kind: str,
        name: str,
        data: Mapping[str, str],
        labels: dict[str, str],
        annotations: Mapping[str, str] | None = None,
    ) -> bool:
        """Create the ConfigMap; False if it exists (another pod was first)."""
        from kubernetes.client.exceptions import ApiException

        body = configmap_body(name, self.ns, data, labels, self.owner, self.uid, annotations)
        try:
            await asyncio.to_thread(self.core.create_namespaced_config_map, self.ns, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                log.info("%s already stored as ConfigMap %s/%s", kind, self.ns, name)
                return False
            raise StoreError(
                f"cannot store {kind} as ConfigMap {self.ns}/{name}: HTTP {exc.status} {exc.reason}"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot reach the Kubernetes API to store {kind}: {exc}") from None

    async def _read(self, kind: StoredKind, model: type[M], index: int | None = None) -> M | None:
        from kubernetes.client.exceptions import ApiException

        name = self._name(kind, index)
        try:
            cm = await asyncio.to_thread(self.core.read_namespaced_config_map, name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise StoreError(f"cannot read ConfigMap {self.ns}/{name}: HTTP {exc.status} {exc.reason}") from None
        return model.model_validate_json((cm.get("data") or {})[CONFIGMAP_DATA_KEY])

    async def _get(self, name: str) -> dict[str, Any] | None:
        """ConfigMap ``name`` if it exists and is this job uid's (not a predecessor's of the same name)."""
        from kubernetes.client.exceptions import ApiException

        try:
            cm: dict[str, Any] = await asyncio.to_thread(self.core.read_namespaced_config_map, name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise StoreError(f"cannot read ConfigMap {self.ns}/{name}: HTTP {exc.status} {exc.reason}") from None
        except OSError as exc:
            raise StoreError(f"cannot reach the Kubernetes API to read ConfigMap {self.ns}/{name}: {exc}") from None
        annotations = (cm.get("metadata") or {}).get("annotations") or {}
        return cm if annotations.get(ANNOTATION_JOB_UID) == self.uid else None

    async def _list(self, kind: StoredKind | None) -> list[dict[str, Any]]:
        """This plan's ConfigMaps of one kind (None: of every kind), of this job uid only, each read by
        its name (concurrently): the worker's Role allows ``get`` on exactly these names and no
        ``list``, which would show it every ConfigMap of the namespace."""
        names = plan_configmap_names(self.job, self.plan, self.max_analysts, None if kind is None else kind.value)
        found = await asyncio.gather(*(self._get(name) for name in names))
        return [cm for cm in found if cm is not None]


class ConfigMapStore(PlanConfigMaps):
    async def save_analysts(self, plan: AnalystPlan) -> bool:
        return await self._create(StoredKind.ANALYSTS, plan)

    async def load_analysts(self) -> AnalystPlan | None:
        return await self._read(StoredKind.ANALYSTS, AnalystPlan)

    async def save_section(self, section: Section) -> bool:
        return await self._create(StoredKind.SECTION, section, section.index)

    async def list_sections(self) -> list[Section]:
        items = await self._list(StoredKind.SECTION)
        sections = (Section.model_validate_json(cm["data"][CONFIGMAP_DATA_KEY]) for cm in items)
        return sorted(sections, key=lambda s: s.index)

    async def section_indices(self) -> set[int]:
        return {int(cm["metadata"]["labels"][LABEL_ANALYST]) for cm in await self._list(StoredKind.SECTION)}

    async def save_report(self, report: Report) -> bool:
        # The Markdown also under its own key, so people can read it with kubectl.
        return await self._create(StoredKind.REPORT, report, extra={CONFIGMAP_REPORT_KEY: report.markdown})

    async def load_report(self) -> Report | None:
        return await self._read(StoredKind.REPORT, Report)

    async def usage(self) -> dict[str, TokenUsage]:
        return usage_of_results(await self.load_analysts(), await self.list_sections(), await self.load_report())

    async def claim_report(self, holder: str) -> bool:
        # Its kind is not a StoredKind: the operator's view of the store passes it by.
        name = configmap_name(self.job, self.plan, REPORT_CLAIM)
        labels = {**self.base_labels, LABEL_KIND: REPORT_CLAIM}
        return await self._create_once(REPORT_CLAIM, name, {"holder": holder}, labels)

    def checkpointer(self) -> Any:
        """The interviews' checkpoints, in ConfigMaps (``research_worker.store.checkpoints``)."""
        saver: ConfigMapCheckpointer | None = getattr(self, "_checkpointer", None)
        if saver is None:
            saver = ConfigMapCheckpointer(self.core, self.ns, self.uid, self._checkpoint_name, self._checkpoint_body)
            self._checkpointer = saver
        return saver

    def _checkpoint_name(self, thread_id: str) -> str:
        # Thread ids are ``<job uid>:<plan>:<analyst>`` (research_worker.steps.interview).
        return configmap_name(self.job, self.plan, CHECKPOINT, int(thread_id.rsplit(":", 1)[1]))

    def _checkpoint_body(self, name: str, data: dict[str, str]) -> dict[str, Any]:
        return configmap_body(name, self.ns, data, dict(self.base_labels), self.owner, self.uid)

    async def close(self) -> None:
        return None
