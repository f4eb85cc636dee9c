"""Markers of the PostgreSQL store: after each commit, a small ConfigMap with the name, labels and
owner the ConfigMap store would use, holding the record the operator needs (research_api.records:
the ``AnalystPlan``, a ``SectionMarker``, a ``ReportMarker``), so the operator, which watches
ConfigMaps and never reads the database, sees the progress."""

from __future__ import annotations

import logging
from typing import Any

from research_api.names import (
    ANNOTATION_POSTGRES_REPORT,
    ANNOTATION_STORE,
    LABEL_ANALYST,
    LABEL_KIND,
    postgres_report_id,
)
from research_api.records import (
    MARKER_STORE,
    AnalystPlan,
    Report,
    ReportMarker,
    Section,
    SectionMarker,
    StoredKind,
    TokenUsage,
    markdown_title,
)
from research_api.task import ResearchTask
from research_worker.store.configmaps import PlanConfigMaps
from research_worker.store.postgres import PostgresStore

log = logging.getLogger(__name__)


class MarkerWriter(PlanConfigMaps):
    """Writes the marker ConfigMaps of the PostgreSQL store. A marker is written only after its row
    is committed, so a marker always means the row exists; writing one twice is a 409, fine."""

    def _annotations(self, **extra: str) -> dict[str, str]:
        return {ANNOTATION_STORE: MARKER_STORE, **extra}

    async def analysts(self, plan: AnalystPlan) -> bool:
        # The whole plan (a few kB even for 50 analysts): the operator shows it in status for review.
        return await self._create(StoredKind.ANALYSTS, plan, annotations=self._annotations())

    async def section(self, section: Section) -> bool:
        marker = SectionMarker(
            index=section.index,
            analyst=section.analyst.name,
            title=section.title,
            found_sources=section.found_sources,
            sources=len(section.sources),
            usage=section.usage,
        )
        return await self._create(StoredKind.SECTION, marker, section.index, annotations=self._annotations())

    async def report(self, report: Report) -> bool:
        report_id = postgres_report_id(self.uid, self.plan)
        marker = ReportMarker(
            title=markdown_title(report.markdown),
            postgres_id=report_id,
            sections=report.sections,
            sources=len(report.sources),
            usage=report.usage,
            quality=report.quality,
        )
        annotations = self._annotations(**{ANNOTATION_POSTGRES_REPORT: report_id})
        return await self._create(StoredKind.REPORT, marker, annotations=annotations)

    async def existing(self) -> set[tuple[str, int | None]]:
        """(kind, analyst index) of every marker of this plan and job uid."""
        out: set[tuple[str, int | None]] = set()
        for cm in await self._list(None):
            labels = (cm.get("metadata") or {}).get("labels") or {}
            idx = labels.get(LABEL_ANALYST)
            out.add((str(labels.get(LABEL_KIND)), int(idx) if idx is not None and idx.isdigit() else None))
        return out


class IndexedStore:
    """The PostgreSQL store plus marker ConfigMaps for the operator (see ``MarkerWriter``).

    Reads go to PostgreSQL. Each save writes its marker after the commit, also when the row was
    already there (a pod retried between commit and marker). ``open`` first writes the markers of
    rows that have none, since a step that finds its work already stored does not save again."""

    def __init__(self, inner: PostgresStore, markers: MarkerWriter) -> None:
        self.inner = inner
        self.markers = markers

    @classmethod
    async def open(cls, task: ResearchTask, dsn: str, api_client: Any) -> IndexedStore:
        store = cls(await PostgresStore.open(task, dsn), MarkerWriter(task, api_client))
        try:
            await store.sync_markers()
        except BaseException:
            await store.close()
            raise
        return store

    async def sync_markers(self) -> int:
        """Write the missing markers of this plan's stored rows; returns how many were written."""
        have = await self.markers.existing()
        written = 0
        plan = await self.inner.load_analysts()
        if plan is not None and (StoredKind.ANALYSTS, None) not in have:
            written += await self.markers.analysts(plan)
        indices = await self.inner.section_indices()
        if any((StoredKind.SECTION, i) not in have for i in indices):
            for section in await self.inner.list_sections():
                if (StoredKind.SECTION, section.index) not in have:
                    written += await self.markers.section(section)
        if (StoredKind.REPORT, None) not in have:
            report = await self.inner.load_report()
            if report is not None:
                written += await self.markers.report(report)
        if written:
            log.info("wrote %d missing marker ConfigMaps for rows already in PostgreSQL", written)
        return written

    async def save_analysts(self, plan: AnalystPlan) -> bool:
        ok = await self.inner.save_analysts(plan)
        stored = plan if ok else await self.inner.load_analysts()
        if stored is not None:
            await self.markers.analysts(stored)  # the stored plan, which may be another pod's
        return ok

    async def load_analysts(self) -> AnalystPlan | None:
        return await self.inner.load_analysts()

    async def save_section(self, section: Section) -> bool:
        ok = await self.inner.save_section(section)
        if ok:
            stored: Section | None = section
        else:
            stored = next((s for s in await self.inner.list_sections() if s.index == section.index), None)
        if stored is not None:
            await self.markers.section(stored)
        return ok

    async def list_sections(self) -> list[Section]:
        return await self.inner.list_sections()

    async def section_indices(self) -> set[int]:
        return await self.inner.section_indices()

    async def save_report(self, report: Report) -> bool:
        ok = await self.inner.save_report(report)
        stored = report if ok else await self.inner.load_report()
        if stored is not None:
            await self.markers.report(stored)
        return ok

    async def load_report(self) -> Report | None:
        return await self.inner.load_report()

    async def usage(self) -> dict[str, TokenUsage]:
        return await self.inner.usage()

    async def claim_report(self, holder: str) -> bool:
        return await self.inner.claim_report(holder)

    def checkpointer(self) -> Any:
        return self.inner.checkpointer()

    async def close(self) -> None:
        await self.inner.close()
