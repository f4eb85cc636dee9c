"""Kubernetes API access for the worker: credentials, and reading a ConfigMap's data."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from research_worker.errors import WorkerConfigError


def kube_api_client() -> Any:
    """In-cluster credentials in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        pass
    try:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        raise WorkerConfigError(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}") from None


class ConfigMaps:
    """The ConfigMap calls a worker makes (create; read and replace by name: its Role allows no list),
    through the kubernetes client's generic ``ApiClient.call_api``, with the objects as plain dicts.
    ``CoreV1Api`` would do the same, but importing its module alone costs about 0.6 CPU-seconds, a
    quarter of a worker pod's start-up, paid by every pod of every ResearchJob. Errors are the
    client's ``ApiException``."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def _call(self, method: str, path: str, params: dict[str, str], **kw: Any) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if "body" in kw:
            headers["Content-Type"] = "application/json"
        request = self.api_client.param_serialize(
            method, path, path_params=params, header_params=headers, auth_settings=["BearerToken"], **kw
        )
        response = self.api_client.call_api(*request)
        response.read()
        # Answers outside 2xx raise ApiException, as CoreV1Api's do.
        out = self.api_client.response_deserialize(response, {"2XX": "object"}).data
        return dict(out or {})

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/v1/namespaces/{namespace}/configmaps", {"namespace": namespace}, body=body)

    def read_namespaced_config_map(self, name: str, namespace: str) -> dict[str, Any]:
        path = "/api/v1/namespaces/{namespace}/configmaps/{name}"
        return self._call("GET", path, {"namespace": namespace, "name": name})

    def replace_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        path = "/api/v1/namespaces/{namespace}/configmaps/{name}"
        return self._call("PUT", path, {"namespace": namespace, "name": name}, body=body)


def load_configmap_data(api_client: Any, namespace: str) -> Callable[[str], dict[str, str]]:
    from kubernetes.client.exceptions import ApiException

    def load(name: str) -> dict[str, str]:
        try:
            cm = ConfigMaps(api_client).read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            raise WorkerConfigError(
                f"cannot read ConfigMap {namespace}/{name}: HTTP {exc.status} {exc.reason}"
            ) from None
        return dict(cm.get("data") or {})

    return load
