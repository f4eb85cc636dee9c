"""A container's environment and command line, resolved the way the kubelet does it.

Pure functions over plain pod/container dicts (the API's JSON form), so they are tested
without a cluster. ConfigMaps and Secrets are read through an :class:`ObjectLookup`.

Rules followed (Kubernetes API reference for ``EnvVar``/``EnvFromSource`` and the kubelet):

- ``envFrom`` sources first, in order, then ``env`` entries, later names overriding earlier ones.
- ``env[].value`` may reference ``$(NAME)`` of variables defined before it (including the
  ``envFrom`` ones and the ``KUBERNETES_*`` service variables); ``$$`` is an escaped ``$``;
  references that do not resolve stay as written. ``valueFrom`` results are not expanded.
- ``command`` and ``args`` are expanded with the container's complete environment.
- A missing ConfigMap/Secret or key that is not ``optional`` is a container configuration
  error: the container stays ``Waiting`` with reason ``CreateContainerConfigError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Protocol, cast

from kubernetes.utils import parse_quantity as _parse_quantity

parse_quantity = cast(Callable[[str], Decimal], _parse_quantity)

POD_IP = "127.0.0.1"
HOST_IP = "127.0.0.1"


class ContainerConfigError(Exception):
    """The container cannot be configured yet (reported as ``CreateContainerConfigError``)."""


class ObjectLookup(Protocol):
    """Reads ConfigMap data and decoded Secret data; ``None`` when the object does not exist."""

    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None: ...

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None: ...


# -- $(VAR) expansion ---------------------------------------------------------------------


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Expand ``$(NAME)`` references in ``text``; ``$$`` yields ``$``; unknown names stay as is."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:
                # An unterminated reference is kept literally.
                out.append("$(")
                i += 2
                continue
            name = text[i + 2 : close]
            value = lookup(name)
            out.append(value if value is not None else f"$({name})")
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def expand_argv(argv: list[str], env: Mapping[str, str]) -> list[str]:
    return [expand(a, env.get) for a in argv]


# -- downward API ---------------------------------------------------------------------------

_META_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref_value(pod: Mapping[str, Any], field_path: str, pod_ip: str = POD_IP) -> str:
    """The value of a ``fieldRef`` for env (the paths the kubelet supports for env vars)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: str(meta.get("name", "")),
        "metadata.namespace": lambda: str(meta.get("namespace", "")),
        "metadata.uid": lambda: str(meta.get("uid", "")),
        "spec.nodeName": lambda: str(spec.get("nodeName", "")),
        "spec.serviceAccountName": lambda: str(spec.get("serviceAccountName") or "default"),
        "status.hostIP": lambda: HOST_IP,
        "status.hostIPs": lambda: HOST_IP,
        "status.podIP": lambda: pod_ip,
        "status.podIPs": lambda: pod_ip,
    }
    if field_path in simple:
        return simple[field_path]()
    m = _META_KEY.match(field_path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ContainerConfigError(f"unsupported fieldRef fieldPath {field_path!r} for an environment variable")


def resource_field_value(
    pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any], allocatable: Mapping[str, str]
) -> str:
    """A ``resourceFieldRef`` value: limits default to the node's allocatable, rounded up."""
    target = container
    if ref.get("containerName"):
        by_name = {c["name"]: c for c in (pod.get("spec") or {}).get("containers", [])}
        if ref["containerName"] not in by_name:
            raise ContainerConfigError(f"resourceFieldRef names unknown container {ref['containerName']!r}")
        target = by_name[ref["containerName"]]
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise ContainerConfigError(f"unsupported resourceFieldRef resource {resource!r}")
    resources = target.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    if raw is None and kind == "limits":
        raw = allocatable.get(name, "0")
    if raw is None and kind == "requests":
        raw = "0"
    divisor_raw = ref.get("divisor") or "1"
    divisor: Decimal = parse_quantity(str(divisor_raw))
    if divisor == 0:
        raise ContainerConfigError(f"resourceFieldRef divisor {divisor_raw!r} is zero")
    value: Decimal = parse_quantity(str(raw))
    return str(math.ceil(value / divisor))


# -- the whole environment ------------------------------------------------------------------


def service_env(apiserver_port: int, host: str = HOST_IP) -> dict[str, str]:
    """The variables every pod gets for the ``default/kubernetes`` Service: loopback and the API
    server's port for process pods, the Service's ClusterIP and 443 for container pods."""
    p = str(apiserver_port)
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": p,
        "KUBERNETES_SERVICE_PORT_HTTPS": p,
        "KUBERNETES_PORT": f"tcp://{host}:{p}",
        f"KUBERNETES_PORT_{p}_TCP": f"tcp://{host}:{p}",
        f"KUBERNETES_PORT_{p}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{p}_TCP_PORT": p,
        f"KUBERNETES_PORT_{p}_TCP_ADDR": host,
    }


def _key_from(kind: str, data: Mapping[str, str] | None, namespace: str, ref: Mapping[str, Any]) -> str | None:
    name = str(ref.get("name", ""))
    key = str(ref.get("key", ""))
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return None
        raise ContainerConfigError(f'{kind.lower()} "{name}" not found')
    if key not in data:
        if optional:
            return None
        raise ContainerConfigError(f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key]


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    lookup: ObjectLookup,
    base_env: Mapping[str, str] | None = None,
    allocatable: Mapping[str, str] | None = None,
    pod_ip: str = POD_IP,
) -> dict[str, str]:
    """The container's variables (``base_env`` first, then ``envFrom``, then ``env``).

    Raises :class:`ContainerConfigError` for a missing non-optional reference.
    """
    namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
    env: dict[str, str] = dict(base_env or {})
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        if "configMapRef" in source:
            ref, kind = source["configMapRef"], "ConfigMap"
            data = lookup.config_map(namespace, str(ref.get("name", "")))
        elif "secretRef" in source:
            ref, kind = source["secretRef"], "Secret"
            data = lookup.secret(namespace, str(ref.get("name", "")))
        else:
            continue
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
        for key, value in data.items():
            if "=" in key:  # not a valid variable name; the kubelet skips such keys
                continue
            env[prefix + key] = value

    for var in container.get("env") or []:
        name = str(var["name"])
        value_from = var.get("valueFrom")
        if not value_from:
            env[name] = expand(str(var.get("value") or ""), env.get)
            continue
        resolved: str | None
        if "secretKeyRef" in value_from:
            ref = value_from["secretKeyRef"]
            resolved = _key_from("Secret", lookup.secret(namespace, str(ref.get("name", ""))), namespace, ref)
        elif "configMapKeyRef" in value_from:
            ref = value_from["configMapKeyRef"]
            cm = lookup.config_map(namespace, str(ref.get("name", "")))
            resolved = _key_from("ConfigMap", cm, namespace, ref)
        elif "fieldRef" in value_from:
            resolved = field_ref_value(pod, str(value_from["fieldRef"].get("fieldPath", "")), pod_ip)
        elif "resourceFieldRef" in value_from:
            resolved = resource_field_value(pod, container, value_from["resourceFieldRef"], allocatable or {})
        else:
            raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(value_from)}")
        if resolved is not None:
            env[name] = resolved
    return env
