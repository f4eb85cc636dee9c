"""Admin-owned model credentials on the real control plane: a cluster admin declares a ModelEndpoint
with its API key (a Secret in the operator's namespace) and the namespaces that may use it; a
tenant names it in spec.model.endpoint and never handles the key. The worker pods call the
endpoint through the operator's model gateway (the lease broker), which adds the key. The model
server here requires that key, so a report proves the key was added on the way."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from offline_model.launcher import ModelServerProcess
from research_api.researchjob import GROUP, VERSION
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import OPERATOR_NAMESPACE, OperatorProcess
from tests.test_endpoint_cluster import conditions, until
from tests.test_operator_cluster import create, researchjob, wait_phase

pytestmark = pytest.mark.cluster

KEY = f"sk-admin-{uuid.uuid4().hex}"  # what only the admins and the operator know


@pytest.fixture
def admin_endpoint(
    cluster: ClusterHandle, operator: OperatorProcess, modelserver_factory: Callable[..., ModelServerProcess]
) -> Iterator[tuple[str, str, ModelServerProcess]]:
    """A model server that requires KEY, the key in a Secret of the operator's namespace, and a
    ModelEndpoint for it selecting the namespaces labelled with a fresh label; yields the endpoint's
    name, that label and the server."""
    api = cluster.api_client()
    server = modelserver_factory(api_key=KEY)
    name = f"team-llm-{uuid.uuid4().hex[:6]}"
    label = f"research-{name}"
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        OPERATOR_NAMESPACE,
        {"metadata": {"name": name}, "data": {"api-key": base64.b64encode(KEY.encode()).decode()}},
    )
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelEndpoint",
        "metadata": {"name": name},
        "spec": {
            "baseUrl": server.base_url,
            "maxConcurrentRequests": 8,
            "apiKeySecretRef": {"name": name, "key": "api-key"},
            "namespaceSelector": {"matchLabels": {label: "yes"}},
        },
    }
    custom.create_cluster_custom_object(GROUP, VERSION, "modelendpoints", body)
    try:
        yield name, label, server
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "modelendpoints", name)
        core.delete_namespaced_secret(name, OPERATOR_NAMESPACE)


def label_namespace(api: client.ApiClient, namespace: str, labels: dict[str, str]) -> None:
    client.CoreV1Api(api).patch_namespace(namespace, {"metadata": {"labels": labels}})


def test_a_tenant_uses_an_admin_endpoint_by_name_and_never_has_its_key(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    admin_endpoint: tuple[str, str, ModelServerProcess],
) -> None:
    api = cluster.api_client()
    name, label, server = admin_endpoint
    label_namespace(api, namespace, {label: "yes"})
    rj = researchjob("by-name", corpus_configmap, analysts={"count": 2}, model={"endpoint": name})
    create(api, namespace, rj)
    status = wait_phase(api, namespace, "by-name", {"Succeeded", "Failed"}, timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    stats = server.stats()
    # Every call reached the endpoint with its key: it answers 401 to anything else.
    assert stats["total"] > 0 and stats["by_status"] == {"200": stats["total"]}, stats
    # ... through the operator's gateway, each call once (the preflight's GET /models included).
    m = re.search(
        r'^research_operator_lease_broker_requests_total\{code="200",path="/gateway"\} (\S+)$', operator.metrics(), re.M
    )
    assert m and float(m.group(1)) >= stats["total"], operator.metrics()
    # The key is nowhere in the tenant's namespace: no Secret holds it, no worker Job names a Secret.
    core = client.CoreV1Api(api)
    for secret in core.list_namespaced_secret(namespace).items:
        values = [base64.b64decode(v).decode(errors="replace") for v in (secret.data or {}).values()]
        assert KEY not in values, secret.metadata.name
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace, label_selector="researchops.io/job=by-name").items
    for job in jobs:
        for c in job.spec.template.spec.containers:
            assert not [e for e in c.env or [] if e.value_from is not None and e.value_from.secret_key_ref], c.env
            assert KEY not in str(c.env)


def test_a_namespace_the_endpoint_does_not_select_is_refused_and_says_why(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    admin_endpoint: tuple[str, str, ModelServerProcess],
) -> None:
    api = cluster.api_client()
    name, label, server = admin_endpoint
    label_namespace(api, namespace, {label: "no"})
    create(api, namespace, researchjob("not-mine", corpus_configmap, analysts={"count": 1}, model={"endpoint": name}))
    create(
        api, namespace, researchjob("nobody", corpus_configmap, analysts={"count": 1}, model={"endpoint": "no-such"})
    )

    def refused(rj: str) -> dict[str, Any] | None:
        cond = conditions(api, namespace, rj).get("PolicyViolation")
        return cond if cond and cond.get("status") == "True" else None

    cond = until("the ResearchJob says the endpoint is not for its namespace", lambda: refused("not-mine"), 60)
    assert cond["reason"] == "EndpointNotAllowed", cond
    assert f'namespace "{namespace}" may not use ModelEndpoint "{name}"' in cond["message"], cond
    cond = until("the ResearchJob says the endpoint does not exist", lambda: refused("nobody"), 60)
    assert 'ModelEndpoint "no-such" does not exist' in cond["message"], cond
    assert not client.BatchV1Api(api).list_namespaced_job(namespace).items
    assert server.stats()["total"] == 0
    # The admins label the namespace: the next look (every 30 s at most) lets it run.
    label_namespace(api, namespace, {label: "yes"})
    status = wait_phase(api, namespace, "not-mine", {"Succeeded", "Failed"}, timeout=300)["status"]
    assert status["phase"] == "Succeeded", status


def test_naming_an_endpoint_with_a_url_of_its_own_is_refused_at_apply(
    cluster: ClusterHandle, namespace: str, corpus_configmap: str
) -> None:
    """The CRD refuses a ResearchJob that names an endpoint together with a URL or key of its own."""
    api = cluster.api_client()
    rj = researchjob(
        "both",
        corpus_configmap,
        model={"endpoint": "team-llm", "baseUrl": "http://attacker.example/v1"},
    )
    with pytest.raises(client.ApiException) as e:
        create(api, namespace, rj)
    assert e.value.status == 422 and "leave model.baseUrl and model.apiKeySecretRef out" in str(e.value.body)
