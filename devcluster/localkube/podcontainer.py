"""Pods as containers (the node agent's ``--containers`` mode): a pod's volumes written to the host
and a container's runtime spec from the pod spec, as the kubelet and its runtime would.

- **Volumes** (``write_volumes``): ``emptyDir`` (a directory, mode 0777, or group-owned by the
  pod's ``fsGroup`` with setgid), ``configMap`` and ``secret`` (a file per key, or per ``items``
  entry, with ``defaultMode``/``mode``, ``optional``), ``downwardAPI`` and ``projected`` (sources
  ``configMap``, ``secret``, ``downwardAPI`` ``fieldRef`` and ``serviceAccountToken``, which the
  caller writes: the node agent's TokenRequest code). The ``kube-api-access-*`` volume the API
  server adds to every pod that automounts its token is such a projected volume: token, ``ca.crt``
  and ``namespace`` at ``/var/run/secrets/kubernetes.io/serviceaccount``, which the Kubernetes
  clients' in-cluster configuration reads. ``hostPath`` and the other kinds are refused
  (``ContainerConfigError``): a container node here has no business handing out the host.
- **Security** (``container_spec``): the user is ``runAsUser``/``runAsGroup`` (container over pod)
  or the image's; ``runAsNonRoot`` refuses uid 0; ``readOnlyRootFilesystem``, and
  ``allowPrivilegeEscalation: false`` is ``noNewPrivileges``; a container gets no capabilities at
  all (restricted's ``drop: [ALL]``; an ``add`` is refused, as is ``privileged``).
- **Resources**: ``limits.memory`` is the memory cgroup's limit (an OOM kill is reported as
  ``OOMKilled``), ``limits.cpu`` the CFS quota; the pod gets a pids limit.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localkube.containers import Container, ContainerError, ContainerSpec, Image, Limits, Mount
from localkube.nodenet import NodeNetwork
from localkube.podenv import ContainerConfigError, ObjectLookup, field_ref_value, parse_quantity

log = logging.getLogger(__name__)

PIDS_LIMIT = 1024  # per container, as a kubelet's podPidsLimit would bound it
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_FILE_MODE = 0o644


@dataclass(frozen=True)
class ProjectedTokenFile:
    """A ``serviceAccountToken`` source: the caller's TokenRequest writes it."""

    volume: str
    path: str
    audience: str
    seconds: int


def _inside(base: Path, relative: str) -> Path:
    target = Path(os.path.normpath(base / relative.lstrip("/")))
    if target != base and base not in target.parents:
        raise ContainerConfigError(f"path {relative!r} leaves its volume")
    return target


def _write(path: Path, data: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _keys(
    kind: str, data: Mapping[str, str] | None, source: Mapping[str, Any], namespace: str
) -> list[tuple[str, str, int | None]]:
    """(path, value, mode) of a configMap or secret source; [] when it is missing and optional."""
    name = str(source.get("name") or source.get("secretName") or "")
    if data is None:
        if source.get("optional"):
            return []
        raise ContainerConfigError(f'{kind} "{name}" not found')
    items = source.get("items")
    if not items:
        return [(k, v, None) for k, v in sorted(data.items())]
    out: list[tuple[str, str, int | None]] = []
    for item in items:
        key = str(item["key"])
        if key not in data:
            if source.get("optional"):
                continue
            raise ContainerConfigError(f"couldn't find key {key} in {kind.capitalize()} {namespace}/{name}")
        out.append((str(item["path"]), data[key], item.get("mode")))
    return out


def write_volumes(
    pod: Mapping[str, Any],
    root: Path,
    lookup: ObjectLookup,
    uid: int,
    fs_group: int | None,
    pod_ip: str,
) -> tuple[dict[str, Path], list[ProjectedTokenFile]]:
    """Write the pod's volumes under ``root/<volume>``; the directories by name, and the token files
    still to be written (their directories exist). Called again on each container start, it brings
    ConfigMap and Secret contents up to date (a real kubelet does so in place while a pod runs)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    namespace = str(meta.get("namespace", "default"))
    dirs: dict[str, Path] = {}
    tokens: list[ProjectedTokenFile] = []
    root.mkdir(parents=True, exist_ok=True, mode=0o711)
    for vol in spec.get("volumes") or []:
        name = str(vol["name"])
        vdir = root / name
        if "emptyDir" in vol:
            vdir.mkdir(exist_ok=True)
            if fs_group is not None:
                os.chown(vdir, -1, fs_group)
                os.chmod(vdir, 0o2775)
            else:
                os.chmod(vdir, 0o777)
            dirs[name] = vdir
            continue
        files: list[tuple[str, str, int | None]] = []
        default_mode = DEFAULT_FILE_MODE
        if "configMap" in vol or "secret" in vol:
            kind = "configMap" if "configMap" in vol else "secret"
            src = vol[kind]
            default_mode = int(src.get("defaultMode") or DEFAULT_FILE_MODE)
            ref = str(src.get("name") or src.get("secretName") or "")
            data = lookup.config_map(namespace, ref) if kind == "configMap" else lookup.secret(namespace, ref)
            files = _keys(kind, data, src, namespace)
        elif "downwardAPI" in vol:
            default_mode = int(vol["downwardAPI"].get("defaultMode") or DEFAULT_FILE_MODE)
            files = _downward(pod, vol["downwardAPI"].get("items") or [], pod_ip)
        elif "projected" in vol:
            proj = vol["projected"]
            default_mode = int(proj.get("defaultMode") or DEFAULT_FILE_MODE)
            for src in proj.get("sources") or []:
                if "configMap" in src:
                    c = src["configMap"]
                    files += _keys("configMap", lookup.config_map(namespace, str(c.get("name"))), c, namespace)
                elif "secret" in src:
                    c = src["secret"]
                    files += _keys("secret", lookup.secret(namespace, str(c.get("name"))), c, namespace)
                elif "downwardAPI" in src:
                    files += _downward(pod, src["downwardAPI"].get("items") or [], pod_ip)
                elif "serviceAccountToken" in src:
                    sat = src["serviceAccountToken"]
                    seconds = max(600, int(sat.get("expirationSeconds") or 3600))
                    tokens.append(ProjectedTokenFile(name, str(sat["path"]), str(sat.get("audience") or ""), seconds))
                    _inside(vdir, str(sat["path"])).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise ContainerConfigError(f"volume {name!r}: {', '.join(kinds)} volumes are not supported on this node")
        vdir.mkdir(exist_ok=True, mode=0o755)
        os.chmod(vdir, 0o755)
        for path, value, mode in files:
            file_mode = int(mode) if mode is not None else default_mode
            target = _inside(vdir, path)
            _write(target, value, file_mode)
            # Readable by the pod's user whatever the mode says of others (the kubelet sets the
            # owner to fsGroup's group; here the file belongs to the pod's uid).
            os.chown(target, uid, fs_group if fs_group is not None else -1)
        dirs[name] = vdir
    return dirs, tokens


def _downward(pod: Mapping[str, Any], items: list[Mapping[str, Any]], pod_ip: str) -> list[tuple[str, str, int | None]]:
    out: list[tuple[str, str, int | None]] = []
    for item in items:
        if "fieldRef" not in item:
            raise ContainerConfigError("only fieldRef items of downwardAPI volumes are supported")
        value = field_ref_value(pod, str(item["fieldRef"]["fieldPath"]), pod_ip)
        out.append((str(item["path"]), value, item.get("mode")))
    return out


def container_mounts(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> tuple[Mount, ...]:
    """The container's ``volumeMounts`` as bind mounts (ConfigMap, Secret and projected read-only)."""
    mounts: list[Mount] = []
    for m in container.get("volumeMounts") or []:
        name = str(m["name"])
        if name not in volumes:
            raise ContainerConfigError(f"volumeMount {name!r} names no volume of the pod")
        source = volumes[name]
        if m.get("subPath"):
            source = _inside(source, str(m["subPath"]))
            if not source.exists():
                source.mkdir(parents=True, mode=0o777)
        mounts.append(Mount(str(m["mountPath"]), source, readonly=bool(m.get("readOnly"))))
    return tuple(mounts)


def _sc(pod: Mapping[str, Any], container: Mapping[str, Any], key: str) -> Any:
    csc = container.get("securityContext") or {}
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    return csc[key] if key in csc else psc.get(key)


def user_of(pod: Mapping[str, Any], container: Mapping[str, Any], image: Image) -> tuple[int, int]:
    """The container's uid and gid: runAsUser/runAsGroup (container over pod), else the image's User."""
    image_uid, _, image_gid = image.user.partition(":")
    run_as = _sc(pod, container, "runAsUser")
    uid = int(run_as) if run_as is not None else int(image_uid or 0)
    run_group = _sc(pod, container, "runAsGroup")
    if run_group is not None:
        gid = int(run_group)
    elif run_as is None and image_gid:
        gid = int(image_gid)
    else:
        gid = 0 if run_as is None else uid
    return uid, gid


def container_spec(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    image: Image,
    argv: list[str],
    env: Mapping[str, str],
    *,
    mounts: tuple[Mount, ...],
    netns: Path,
    pod_ip: str,
    resolv_conf: str,
) -> ContainerSpec:
    """The runtime spec of one container of a pod; ``ContainerConfigError`` for what the node refuses."""
    uid, gid = user_of(pod, container, image)
    if _sc(pod, container, "runAsNonRoot") and uid == 0:
        raise ContainerConfigError("container has runAsNonRoot and image will run as root")
    csc = container.get("securityContext") or {}
    if csc.get("privileged"):
        raise ContainerConfigError("privileged containers are not run on this node")
    added = (csc.get("capabilities") or {}).get("add") or []
    if added:
        raise ContainerConfigError(f"capabilities {added} are not granted on this node (every capability is dropped)")
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    groups = [int(g) for g in psc.get("supplementalGroups") or []]
    if psc.get("fsGroup") is not None:
        groups.append(int(psc["fsGroup"]))
    limits = (container.get("resources") or {}).get("limits") or {}
    memory = int(parse_quantity(str(limits["memory"]))) if "memory" in limits else None
    cpu = math.ceil(parse_quantity(str(limits["cpu"])) * 1000) if "cpu" in limits else None
    return ContainerSpec(
        command=argv,
        args=(),
        env=dict(env),
        user=f"{uid}:{gid}",
        limits=Limits(memory_bytes=memory, pids=PIDS_LIMIT, cpu_millis=cpu),
        hostname=str((pod.get("metadata") or {}).get("name", "pod"))[:63],
        netns=netns,
        ip=pod_ip,
        mounts=mounts,
        readonly_root=bool(csc.get("readOnlyRootFilesystem")),
        no_new_privileges=csc.get("allowPrivilegeEscalation") is not True,
        cwd=container.get("workingDir"),
        groups=tuple(groups),
        resolv_conf=resolv_conf,
    )


def image_argv(container: Mapping[str, Any], image: Image) -> list[str]:
    """``command`` replaces the image's Entrypoint (and drops its Cmd); ``args`` replace the Cmd."""
    command = [str(a) for a in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if command:
        return [*command, *args]
    argv = [*image.entrypoint, *(args or image.cmd)]
    if not argv:
        raise ContainerConfigError("the image has neither Entrypoint nor Cmd and the container sets no command")
    return argv


def image_reference(image: str) -> str:
    """``name:tag`` of an image reference, without a registry (``localhost/``, ``docker.io/library/``)."""
    ref = image.split("@", 1)[0]
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        ref = rest
    ref = ref.removeprefix("library/")
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"


@dataclass
class ContainerNode:
    """What a container node's pods share: the one image it serves, its network, and where runc
    keeps its state and bundles."""

    image: Image
    image_name: str  # e.g. research-operator:0.1.0: the only image this node has (no registry here)
    network: NodeNetwork
    runtime_dir: Path
    api_service_ip: str  # the ClusterIP of default/kubernetes; pods reach the API server there on 443

    def serves(self, image: str) -> bool:
        return image_reference(image) == image_reference(self.image_name)


class PodContainerProcess:
    """A started container as the pod worker sees a process: ``poll``/``wait`` give its exit status
    (``runc run`` in the foreground exits with it), ``signal`` goes through ``runc kill``, and
    ``finish`` tells an OOM kill or a start failure and removes the container."""

    def __init__(self, container: Container) -> None:
        self.container = container
        proc = container.process
        assert proc is not None, "start the container first"
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        try:
            self.container.kill(signal.Signals(sig))
        except ContainerError as e:
            log.warning("%s", e)
        if sig == signal.SIGKILL and self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # runc itself; its container is gone with the cgroup on delete

    def finish(self) -> tuple[str | None, str]:
        """(reason, message) of the ended container: ``OOMKilled``, ``StartError`` (with runc's
        words) or None; then the container is deleted (its cgroup, state and bundle)."""
        reason: str | None = None
        message = ""
        if not self.container.started():
            reason = "StartError"
            log_path = self.container.log_path
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path else []
            message = " ".join(tail)[-1000:]
        elif self.container.oom_killed():
            reason = "OOMKilled"
        self.container.delete()
        return reason, message
