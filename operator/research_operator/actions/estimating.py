"""The estimate of a ResearchJob before it starts: what ``research_api.estimate`` (the function
``kubectl research submit --estimate`` calls too) makes of its spec, the documents of its documents
sources (read from their ConfigMaps) and the prices of the ModelEndpoint it would be admitted against.
The reconcile decision compares it with the job's ceilings (``reconcile.over_ceiling``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from research_api.estimate import estimate
from research_api.modelendpoint import Prices
from research_api.researchjob import ResearchJobSpec, SourceType
from research_operator.decisions import endpoints
from research_operator.decisions.reconcile import Estimated

ReadConfigMap = Callable[[str, str], Awaitable[dict[str, str] | None]]


async def estimate_of(
    namespace: str,
    spec: ResearchJobSpec,
    read_configmap: ReadConfigMap,
    known: Mapping[str, endpoints.Endpoint],
    default_base_url: str,
) -> Estimated:
    """The estimate of a ResearchJob in ``namespace`` with ``spec``, or why there is none (a documents
    ConfigMap that does not exist)."""
    documents: dict[str, str] | None = None
    for i, s in enumerate(spec.sources):
        if s.type != SourceType.documents or s.config_map is None:
            continue
        data = await read_configmap(namespace, s.config_map)
        if data is None:
            return Estimated(None, f'spec.sources[{i}]: ConfigMap "{s.config_map}" does not exist')
        documents = {**(documents or {}), **data}
    model = spec.model
    endpoint = endpoints.calls(known, model.endpoint, model.base_url or default_base_url, model.name)
    prices = None
    if endpoint is not None and endpoint.prices is not None:
        p = endpoint.prices
        prices = Prices(input_per_million=str(p.input_per_million), output_per_million=str(p.output_per_million))
    return Estimated(estimate(spec, documents, prices), endpoint=endpoint.name if endpoint is not None else "")
