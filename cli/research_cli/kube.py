"""The connection to the cluster, as kubectl makes it: ``--kubeconfig`` (else $KUBECONFIG, else
~/.kube/config, else in-cluster credentials), ``--context``, and the namespace from ``-n`` or the
context. Every API request goes through :meth:`Kube.call`, which turns a failed request into a
one-line :class:`CliError` (unreachable server, not found, forbidden, invalid) with the server's
own message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from research_api.researchjob import GROUP, PLURAL, VERSION
from research_cli.errors import CliError

T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
CRD = f"{PLURAL}.{GROUP}"


def server_message(exc: ApiException) -> str:
    """The ``message`` of the API server's Status body, else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"HTTP {exc.status} {exc.reason or ''}".strip()


def is_missing_api(exc: ApiException) -> bool:
    """A 404 for the resource type itself (the CRD is not installed), not for one object."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return True
    return not (isinstance(body, dict) and body.get("details"))


@dataclass
class Kube:
    api: client.ApiClient
    namespace: str  # -n, else the context's namespace, else "default"
    server: str
    kubeconfig: str | None  # the file the credentials came from (None: in-cluster)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One API request; ``what`` names it for the error message ("get researchjob team-a/x")."""
        kwargs.setdefault("_request_timeout", (CONNECT_TIMEOUT, READ_TIMEOUT))
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise CliError(f"cannot {what}: {exc.reason}") from None
            raise CliError(f"cannot {what}: {server_message(exc)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise CliError(f"cannot reach the Kubernetes API server at {self.server}: {_reason(exc)}") from None

    def plain(self, obj: Any) -> dict[str, Any]:
        """An API object as the JSON the server sent (camelCase keys)."""
        return dict(self.api.sanitize_for_serialization(obj))  # type: ignore[no-untyped-call]

    def items(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """A list request's items as plain JSON objects."""
        return [self.plain(i) for i in self.call(what, fn, *args, **kwargs).items]

    def get_researchjob(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
            )
        except ApiException as exc:
            if exc.status == 404 and is_missing_api(exc):
                raise CliError(f"the ResearchJob API ({CRD}) is not installed in this cluster") from None
            if exc.status == 404:
                raise CliError(f'researchjob "{name}" not found in namespace "{namespace}"') from None
            raise CliError(f"cannot get researchjob {namespace}/{name}: {server_message(exc)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise CliError(f"cannot reach the Kubernetes API server at {self.server}: {_reason(exc)}") from None
        return cast(dict[str, Any], obj)

    def list_researchjobs(self, namespace: str | None) -> list[dict[str, Any]]:
        try:
            if namespace is None:
                out = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
                )
            else:
                out = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
                )
        except ApiException as exc:
            if exc.status == 404:
                raise CliError(f"the ResearchJob API ({CRD}) is not installed in this cluster") from None
            raise CliError(f"cannot list researchjobs: {server_message(exc)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise CliError(f"cannot reach the Kubernetes API server at {self.server}: {_reason(exc)}") from None
        return [dict(i) for i in cast(dict[str, Any], out).get("items", [])]

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection failure, in a few words."""
    inner: BaseException = exc
    while True:
        nxt = getattr(inner, "reason", None)
        if isinstance(nxt, BaseException) and nxt is not inner:
            inner = nxt
            continue
        break
    text = str(inner)
    for known in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if known.lower() in text.lower():
            return known.lower()
    return text.split(": ", 1)[-1] if ": " in text else text or type(inner).__name__


def connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Kube:
    """A client as kubectl would build it from these flags."""
    cfg = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    ctx_namespace = "default"
    used: str | None = path
    if os.path.exists(path):
        try:
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg)  # type: ignore[no-untyped-call]
            contexts, active = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        except (config.ConfigException, ValueError, KeyError, TypeError) as exc:
            raise CliError(f"invalid kubeconfig {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        chosen = next((c for c in contexts or [] if c.get("name") == context), None) if context else active
        ctx_namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    elif kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise CliError(
            f"no kubeconfig at {path} and no in-cluster credentials: point --kubeconfig or $KUBECONFIG at a cluster"
        )
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException as exc:
            raise CliError(f"no usable in-cluster credentials: {exc}") from None
        used = None
        sa_ns = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        if os.path.exists(sa_ns):
            with open(sa_ns) as f:
                ctx_namespace = f.read().strip() or "default"
    cfg.retries = 1  # a down server fails in a second, not after urllib3's default retries
    return Kube(client.ApiClient(cfg), namespace or ctx_namespace, str(cfg.host), used)
