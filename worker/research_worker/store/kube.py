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


def load_configmap_data(api_client: Any, namespace: str) -> Callable[[str], dict[str, str]]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    def load(name: str) -> dict[str, str]:
        try:
            cm = client.CoreV1Api(api_client).read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            raise WorkerConfigError(
                f"cannot read ConfigMap {namespace}/{name}: HTTP {exc.status} {exc.reason}"
            ) from None
        return dict(cm.data or {})

    return load
