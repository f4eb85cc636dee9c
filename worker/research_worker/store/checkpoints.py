"""Interview checkpoints in ConfigMaps: the ConfigMap store's LangGraph checkpointer.

The PostgreSQL store resumes an unfinished interview from its last finished node (LangGraph's
Postgres saver); this gives the ConfigMap store the same, so a pod stopped mid-interview (a SIGTERM
drains the calls in flight, see ``research_worker.stopping``) and retried pays again for no node it
had finished. One ConfigMap per interview thread (``<job>-<plan>-checkpoint-<analyst>``, owned by
the ResearchJob, so it goes with it) holds that thread's *latest* checkpoint only, written after
each finished step of the graph: resuming needs nothing older, and a ConfigMap per step would load
the API server for nothing. It carries no ``researchops.io/kind`` label: the operator's ConfigMap
watch never sees it. A write that fails (the API server away, a state over a ConfigMap's 1 MiB) is
logged and skipped: a checkpoint saves work, it never stops it.

Pending writes of the step in progress stay in memory: the steps of an interview that call the
model run one at a time (only the searches fan out), so losing them costs no model call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)

from research_api.names import ANNOTATION_JOB_UID, CONFIGMAP_DATA_KEY, CONFIGMAP_DATA_LIMIT

log = logging.getLogger(__name__)

FORMAT = 1


class _Thread:
    """One interview thread's latest checkpoint and the writes of the step in progress."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.loaded = False
        self.exists = False  # its ConfigMap exists (create first, replace after)
        self.checkpoint: Checkpoint | None = None  # with every channel's value
        self.metadata: CheckpointMetadata | None = None
        self.parent: str | None = None
        self.writes: dict[tuple[str, int], tuple[str, str, Any, str]] = {}  # of the latest checkpoint
        self.broken = False  # a write was refused as too large: the thread is no longer saved


class ConfigMapCheckpointer(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer over ConfigMaps (async only, as the worker runs its graphs: the sync
    methods are LangGraph's, which raise NotImplementedError).

    ``configmaps``: the worker's ConfigMap client (``research_worker.store.kube.ConfigMaps``);
    ``name_of``: the ConfigMap of a thread id (``<job uid>:<plan>:<analyst>``); ``body``: the
    manifest of a ConfigMap of that name holding the given data (owner, annotations)."""

    def __init__(
        self,
        configmaps: Any,
        namespace: str,
        uid: str,
        name_of: Callable[[str], str],
        body: Callable[[str, dict[str, str]], dict[str, Any]],
    ) -> None:
        super().__init__()
        self.core = configmaps
        self.ns = namespace
        self.uid = uid
        self.name_of = name_of
        self.body = body
        self.threads: dict[str, _Thread] = {}

    # -- reading ------------------------------------------------------------------------------

    async def _thread(self, thread_id: str) -> _Thread:
        t = self.threads.setdefault(thread_id, _Thread())
        if t.loaded:
            return t
        from kubernetes.client.exceptions import ApiException

        name = self.name_of(thread_id)
        try:
            cm = await asyncio.to_thread(self.core.read_namespaced_config_map, name, self.ns)
        except ApiException as exc:
            if exc.status != 404:
                log.warning(
                    "cannot read the checkpoint %s/%s (HTTP %s): the interview starts over", self.ns, name, exc.status
                )
            cm = None
        except OSError as exc:
            log.warning("cannot read the checkpoint %s/%s (%s): the interview starts over", self.ns, name, exc)
            cm = None
        t.loaded = True
        if cm is None:
            return t
        t.exists = True
        annotations = (cm.get("metadata") or {}).get("annotations") or {}
        if annotations.get(ANNOTATION_JOB_UID) != self.uid:
            return t  # a predecessor's of the same name: start over, and overwrite it
        try:
            saved = json.loads((cm.get("data") or {})[CONFIGMAP_DATA_KEY])
            if saved.get("format") != FORMAT:
                return t
            t.checkpoint = self.serde.loads_typed(_unpack(saved["checkpoint"]))
            t.metadata = self.serde.loads_typed(_unpack(saved["metadata"]))
            t.parent = saved.get("parent")
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("the checkpoint %s/%s is unreadable (%s): the interview starts over", self.ns, name, exc)
            t.checkpoint = t.metadata = None
        return t

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id = str(config["configurable"]["thread_id"])
        ns = str(config["configurable"].get("checkpoint_ns", ""))
        t = await self._thread(thread_id)
        if t.checkpoint is None or t.metadata is None:
            return None
        wanted = get_checkpoint_id(config)
        if wanted and wanted != t.checkpoint["id"]:
            return None  # only the latest is kept
        own: RunnableConfig = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": t.checkpoint["id"]}
        }
        parent: RunnableConfig | None = (
            {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": t.parent}}
            if t.parent
            else None
        )
        pending = [(task, channel, value) for task, channel, value, _ in t.writes.values()]
        return CheckpointTuple(own, t.checkpoint, t.metadata, parent, pending)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        if config is None or limit == 0:
            return
        found = await self.aget_tuple(config)
        if found is not None and (not filter or all(found.metadata.get(k) == v for k, v in filter.items())):
            yield found

    # -- writing ------------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        thread_id = str(config["configurable"]["thread_id"])
        ns = str(config["configurable"].get("checkpoint_ns", ""))
        t = await self._thread(thread_id)
        async with t.lock:
            # A checkpoint carries the values of the channels that changed: keep every channel's
            # latest value, so the one checkpoint kept is whole.
            values = dict(t.checkpoint["channel_values"]) if t.checkpoint is not None else {}
            given = checkpoint.get("channel_values") or {}
            values.update(given)
            for channel in new_versions:
                if channel not in given:
                    values.pop(channel, None)
            t.checkpoint = {**checkpoint, "channel_values": values}
            t.metadata = get_checkpoint_metadata(config, metadata)
            t.parent = config["configurable"].get("checkpoint_id")
            t.writes = {}
            await self._save(thread_id, t)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}}

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        t = await self._thread(str(config["configurable"]["thread_id"]))
        if t.checkpoint is None or config["configurable"].get("checkpoint_id") != t.checkpoint["id"]:
            return
        for idx, (channel, value) in enumerate(writes):
            key = (task_id, WRITES_IDX_MAP.get(channel, idx))
            if key[1] >= 0 and key in t.writes:
                continue
            t.writes[key] = (task_id, channel, value, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        self.threads.pop(thread_id, None)  # the ConfigMap goes with its ResearchJob

    def get_next_version(self, current: str | None, channel: None) -> str:
        current_v = 0 if current is None else int(str(current).split(".")[0])
        return f"{current_v + 1:032}.0"

    async def _save(self, thread_id: str, t: _Thread) -> None:
        from kubernetes.client.exceptions import ApiException

        if t.broken or t.checkpoint is None or t.metadata is None:
            return
        name = self.name_of(thread_id)
        saved = {
            "format": FORMAT,
            "checkpoint": _pack(self.serde.dumps_typed(t.checkpoint)),
            "metadata": _pack(self.serde.dumps_typed(t.metadata)),
            "parent": t.parent,
        }
        data = {CONFIGMAP_DATA_KEY: json.dumps(saved, separators=(",", ":"))}
        if len(data[CONFIGMAP_DATA_KEY]) > CONFIGMAP_DATA_LIMIT - 1024:
            t.broken = True
            log.warning(
                "the interview %s outgrew a ConfigMap (%d bytes): it is no longer checkpointed",
                name,
                len(data[CONFIGMAP_DATA_KEY]),
            )
            return
        body = self.body(name, data)
        try:
            if t.exists:
                await asyncio.to_thread(self.core.replace_namespaced_config_map, name, self.ns, body)
            else:
                try:
                    await asyncio.to_thread(self.core.create_namespaced_config_map, self.ns, body)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    await asyncio.to_thread(self.core.replace_namespaced_config_map, name, self.ns, body)
                t.exists = True
        except (ApiException, OSError) as exc:
            status = getattr(exc, "status", None) or exc
            log.warning("cannot write the checkpoint %s/%s (%s): the interview goes on", self.ns, name, status)


def _pack(typed: tuple[str, bytes]) -> list[str]:
    return [typed[0], base64.b64encode(typed[1]).decode()]


def _unpack(packed: list[str]) -> tuple[str, bytes]:
    return packed[0], base64.b64decode(packed[1])
