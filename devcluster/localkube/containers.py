"""Run the product image as containers with runc: the first piece of a node that runs pods as
containers (issue 23), not yet wired into the node agent.

``hack/build-image.sh`` builds the image with buildah and exports it: ``rootfs/`` (the image's file
system) and ``image.json`` (``buildah inspect``: Entrypoint, Cmd, Env, User, WorkingDir). This
module turns that export plus a :class:`ContainerSpec` into an OCI runtime bundle
(``config.json``, runtime-spec 1.0) and runs it with ``runc run --keep``:

- the image's root file system, read-only and shared by every container (nothing is copied);
  ``/tmp`` a private tmpfs, ``/etc/hosts``, ``/etc/hostname`` and ``/etc/resolv.conf`` read-only
  files of the bundle, as the kubelet gives a pod;
- the image's user (65532:65532) unless the spec says otherwise, no capabilities at all,
  ``noNewPrivileges``, the runtime-spec's default masked and read-only ``/proc`` paths;
- its own pid, ipc, uts and mount namespaces; the network namespace is the host's (``netns=None``)
  or one the caller made and names by path, e.g. a :class:`PodNetwork`: a named network namespace
  joined to the host by a veth pair with a /30 of 10.244.0.0/16, so the host reaches the
  container's own IP over a directly connected link (no routing, the host's ``ip_forward`` stays 0);
- memory, pids and cpu limits in a cgroup ``/research-operator/<id>`` (runc's cgroupfs driver:
  there is no systemd here, and the v1/v2 hybrid layout is what runc handles and crun refuses);
- explicit rlimits: ``RLIMIT_NOFILE`` 20000 and ``RLIMIT_NPROC`` 32768. runc sets what the
  config says, and without CAP_SYS_RESOURCE a value above the caller's hard limit fails the start,
  so these are at most this machine's hard limits rather than the usual 1048576.

``--keep`` leaves the container's cgroup in place after its init exits, so the memory controller's
``oom_kill`` counter can be read before ``runc delete`` removes it: that is how an exit 137 is told
apart as ``OOMKilled`` from a plain SIGKILL, as the kubelet reports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localkube.controlplane import REPO_ROOT, cache_dir

log = logging.getLogger(__name__)

RUNC = os.environ.get("RUNC", "runc")
CGROUP_PARENT = "/research-operator"
DEFAULT_RLIMITS: tuple[tuple[str, int], ...] = (("RLIMIT_NOFILE", 20000), ("RLIMIT_NPROC", 32768))
# The runtime-spec's default config (runc spec) hides these /proc and /sys paths from containers.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# Where a container without readOnlyRootFilesystem may write (tmpfs each; /tmp always is one).
WRITABLE_DIRS = ("/var/tmp", "/run", "/home")


class ContainerError(Exception):
    """runc could not create or control the container (not: the container's process failed)."""


@dataclass(frozen=True)
class Image:
    """An exported image: its root file system and the parts of its config a runtime uses."""

    directory: Path
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    user: str
    working_dir: str

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"


def load_image(directory: Path) -> Image:
    """Read an export of ``hack/build-image.sh`` (its ``image.json`` is ``buildah inspect``)."""
    inspect = json.loads((directory / "image.json").read_text())
    config = inspect["OCIv1"].get("config") or {}
    return Image(
        directory=directory,
        entrypoint=tuple(config.get("Entrypoint") or ()),
        cmd=tuple(config.get("Cmd") or ()),
        env=tuple(config.get("Env") or ()),
        user=str(config.get("User") or "0:0"),
        working_dir=str(config.get("WorkingDir") or "/"),
    )


def build_image() -> Image:
    """Build the product image (or find it cached) with buildah and load its export."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-image.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "IMAGE_BUILDER": "buildah"},
    )
    return load_image(Path(out.stdout.strip().splitlines()[-1]))


@dataclass(frozen=True)
class Limits:
    """A container's cgroup limits; ``None`` leaves a resource unlimited."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpu_millis: int | None = None  # 1000 = one CPU (CFS quota per 100 ms period)


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host path (a pod volume's directory or one of its files) into the container."""

    destination: str
    source: Path
    readonly: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """What to run, with Kubernetes' rules for ``command`` and ``args`` over the image's
    Entrypoint and Cmd (see :func:`container_argv`)."""

    command: Sequence[str] = ()
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None  # "uid:gid"; None: the image's User
    limits: Limits = Limits()
    tmp_size_bytes: int = 64 << 20
    hostname: str = "container"
    netns: Path | None = None  # None: the host's network namespace
    ip: str | None = None  # the container's address in netns, for /etc/hosts (as the kubelet writes it)
    rlimits: tuple[tuple[str, int], ...] = DEFAULT_RLIMITS
    mounts: tuple[Mount, ...] = ()  # pod volumes (bind mounts), after the container's own mounts
    readonly_root: bool = True  # a pod's readOnlyRootFilesystem (the image's rootfs is shared: never written)
    no_new_privileges: bool = True  # allowPrivilegeEscalation: false
    cwd: str | None = None  # None: the image's WorkingDir
    groups: tuple[int, ...] = ()  # supplementalGroups and fsGroup, besides the primary group
    resolv_conf: str | None = None  # None: the host's /etc/resolv.conf


def container_argv(image: Image, command: Sequence[str], args: Sequence[str]) -> list[str]:
    """``command`` replaces the Entrypoint (and drops the Cmd); ``args`` replace the Cmd."""
    if command:
        return [*command, *args]
    argv = [*image.entrypoint, *(args or image.cmd)]
    if not argv:
        raise ValueError("the image has neither Entrypoint nor Cmd and the spec sets no command")
    return argv


def _uid_gid(user: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if match is None:
        # runc resolves names through the container's /etc/passwd; a runAsNonRoot check cannot.
        raise ValueError(f"user {user!r} is not numeric (uid or uid:gid)")
    uid = int(match.group(1))
    return uid, int(match.group(2) or uid)


def _merged_env(image_env: Sequence[str], extra: Mapping[str, str], hostname: str) -> list[str]:
    env: dict[str, str] = {}
    for item in image_env:
        name, _, value = item.partition("=")
        env[name] = value
    env["HOSTNAME"] = hostname
    env.update(extra)
    return [f"{k}={v}" for k, v in env.items()]


def runtime_spec(image: Image, spec: ContainerSpec, bundle: Path, cgroups_path: str) -> dict[str, Any]:
    """The OCI runtime config (``config.json``) of one container: a pure function of its inputs."""
    uid, gid = _uid_gid(spec.user or image.user)
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.limits.memory_bytes is not None:
        resources["memory"] = {"limit": spec.limits.memory_bytes}
    if spec.limits.pids is not None:
        resources["pids"] = {"limit": spec.limits.pids}
    if spec.limits.cpu_millis is not None:
        resources["cpu"] = {"quota": spec.limits.cpu_millis * 100, "period": 100_000}
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if spec.netns is not None:
        namespaces.append({"type": "network", "path": str(spec.netns)})
    ro_file = ["rbind", "ro", "nosuid", "nodev", "noexec"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": sorted({gid, *spec.groups})},
            "args": container_argv(image, spec.command, spec.args),
            "env": _merged_env(image.env, spec.env, spec.hostname),
            "cwd": spec.cwd or image.working_dir,
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": t, "hard": v, "soft": v} for t, v in spec.rlimits],
            "noNewPrivileges": spec.no_new_privileges,
        },
        # The rootfs is shared by every container of the image, so it is mounted read-only whatever
        # the pod says; a pod without readOnlyRootFilesystem gets writable tmpfs over the few
        # places a program writes to (see writable_dirs).
        "root": {"path": str(image.rootfs), "readonly": True},
        "hostname": spec.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "bind", "source": "/sys",
             "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", f"size={spec.tmp_size_bytes}"]},
            {"destination": "/etc/hosts", "type": "bind", "source": str(bundle / "hosts"), "options": ro_file},
            {"destination": "/etc/hostname", "type": "bind", "source": str(bundle / "hostname"), "options": ro_file},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": str(bundle / "resolv.conf"),
             "options": ro_file},
            *(
                {"destination": d, "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "mode=1777", f"size={spec.tmp_size_bytes}"]}
                for d in ([] if spec.readonly_root else list(WRITABLE_DIRS))
            ),
            *(
                {"destination": m.destination, "type": "bind", "source": str(m.source),
                 "options": ["rbind", "nosuid", "nodev", "ro" if m.readonly else "rw"]}
                for m in spec.mounts
            ),
        ],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


@dataclass(frozen=True)
class Result:
    """How a container ended, as a user would read it in a pod's status."""

    exit_code: int  # 128 + n when killed by signal n, as runc and the kubelet report it
    oom_killed: bool
    stdout: str
    stderr: str
    seconds: float

    @property
    def reason(self) -> str:
        if self.oom_killed:
            return "OOMKilled"
        return "Completed" if self.exit_code == 0 else "Error"


def _memory_cgroup_dir(cgroups_path: str) -> Path | None:
    """Where the memory controller keeps this cgroup: a v1 ``memory`` hierarchy, else cgroup2."""
    v2: Path | None = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3:
            continue
        fstype, options = post_fields[0], post_fields[2].split(",")
        if fstype == "cgroup" and "memory" in options:
            return Path(fields[4]) / cgroups_path.lstrip("/")
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(fields[4]) / cgroups_path.lstrip("/")
    return v2


def _oom_kills(cgroup: Path | None) -> int:
    """The memory controller's OOM-kill count of a cgroup (v1 memory.oom_control, v2 memory.events)."""
    if cgroup is None:
        return 0
    for name in ("memory.oom_control", "memory.events"):
        try:
            text = (cgroup / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ContainerError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class PodNetwork:
    """A network namespace ``ro-<n>`` with its own loopback and one veth link to the host:
    host side ``10.244.255.<4n+1>/30`` (interface ``rov<n>h``), namespace side
    ``10.244.255.<4n+2>/30`` (``eth0``). ``n`` (0-63) must be unused; ``delete()`` removes both."""

    def __init__(self, index: int) -> None:
        if not 0 <= index < 64:
            raise ValueError("a PodNetwork index is 0-63")
        self.name = f"ro-{index}"
        self.host_if = f"rov{index}h"
        self.host_ip = f"10.244.255.{4 * index + 1}"
        self.ip = f"10.244.255.{4 * index + 2}"
        self.path = Path("/run/netns") / self.name

    def create(self) -> None:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ip}/30", "dev", "eth0")
            _ip("-n", self.name, "link", "set", "eth0", "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except ContainerError:
            self.delete()
            raise

    def delete(self) -> None:
        # Deleting the namespace removes its end of the veth pair, and with it the host's end.
        subprocess.run(["ip", "link", "del", self.host_if], stderr=subprocess.DEVNULL, check=False)
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL, check=False)

    def __enter__(self) -> PodNetwork:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


class Container:
    """One container: ``start()``, then ``wait()`` or ``stop(grace)``, then ``delete()`` (or use it
    as a context manager, which deletes it). Output goes to files in the bundle, read at the end
    (``logs()`` reads them while it runs)."""

    def __init__(self, image: Image, spec: ContainerSpec, *, name: str | None = None,
                 state_dir: Path | None = None, log_path: Path | None = None) -> None:
        self.image = image
        self.spec = spec
        self.id = name or f"ro-{uuid.uuid4().hex[:12]}"
        root = state_dir or cache_dir() / "containers"
        self.bundle = root / "bundles" / self.id
        self.runc_root = root / "runc"
        self.cgroups_path = f"{CGROUP_PARENT}/{self.id}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._result: Result | None = None
        self.log_path = log_path  # stdout and stderr appended to one file (a pod's log), else two in the bundle

    def _runc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RUNC, "--root", str(self.runc_root), *args],
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        self.bundle.mkdir(parents=True, exist_ok=False)
        self.runc_root.mkdir(parents=True, exist_ok=True)
        config = runtime_spec(self.image, self.spec, self.bundle, self.cgroups_path)
        (self.bundle / "config.json").write_text(json.dumps(config, indent=1))
        (self.bundle / "hostname").write_text(self.spec.hostname + "\n")
        own = self.spec.ip or "127.0.1.1"
        (self.bundle / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{own}\t{self.spec.hostname}\n")
        resolv = Path("/etc/resolv.conf")
        if self.spec.resolv_conf is not None:
            (self.bundle / "resolv.conf").write_text(self.spec.resolv_conf)
        else:
            (self.bundle / "resolv.conf").write_text(resolv.read_text() if resolv.exists() else "")
        out_path, err_path = self.bundle / "stdout", self.bundle / "stderr"
        if self.log_path is not None:
            out_path = err_path = self.log_path
        with open(out_path, "ab") as out, open(err_path, "ab") as err:
            self._proc = subprocess.Popen(
                [RUNC, "--root", str(self.runc_root), "run", "--keep", "--pid-file", str(self.bundle / "pid"),
                 "--bundle", str(self.bundle), self.id],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
        self._started = time.monotonic()
        log.info("container %s started: %s", self.id, " ".join(config["process"]["args"]))

    def logs(self) -> tuple[str, str]:
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace"), ""
        return ((self.bundle / "stdout").read_text(errors="replace"),
                (self.bundle / "stderr").read_text(errors="replace"))

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """``runc run`` in the foreground: it exits with the container's exit status (128 + n for
        signal n) and forwards the signals it gets to the container's init."""
        return self._proc

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for the container's init to exit (``subprocess.TimeoutExpired`` if it does not)."""
        if self._result is not None:
            return self._result
        if self._proc is None:
            raise ContainerError(f"container {self.id} was never started")
        code = self._proc.wait(timeout)
        seconds = time.monotonic() - self._started
        if code < 0:  # runc itself was killed; its container is reported by its own status
            code = 128 - code
        stdout, stderr = self.logs()
        if not (self.bundle / "pid").exists():
            # runc writes the pid file once the container's process runs; without it the container
            # never started (the kubelet's StartError): runc's reason is the last line of stderr.
            raise ContainerError(f"container {self.id} did not start (runc exit {code}): {stderr.strip()[-2000:]}")
        oom = _oom_kills(_memory_cgroup_dir(self.cgroups_path)) > 0
        self._result = Result(exit_code=code, oom_killed=oom, stdout=stdout, stderr=stderr, seconds=seconds)
        return self._result

    def started(self) -> bool:
        """Whether the container's process ran (runc writes the pid file only then)."""
        return (self.bundle / "pid").exists()

    def oom_killed(self) -> bool:
        """Whether the memory controller OOM-killed a process of the container (before ``delete``)."""
        return _oom_kills(_memory_cgroup_dir(self.cgroups_path)) > 0

    def exec(self, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        """Run ``argv`` in the running container (its namespaces, user and cgroup): exit code, output."""
        done = subprocess.run(
            [RUNC, "--root", str(self.runc_root), "exec", self.id, *argv],
            capture_output=True, text=True, timeout=timeout,
        )
        return done.returncode, done.stdout + done.stderr

    def status(self) -> str | None:
        """runc's view of the container: created, running, stopped (or None: no such container)."""
        done = self._runc("state", self.id)
        if done.returncode != 0:
            return None
        return str(json.loads(done.stdout)["status"])

    def kill(self, sig: signal.Signals) -> None:
        done = self._runc("kill", self.id, sig.name.removeprefix("SIG"))
        # The process may have ended between the caller's look and the signal: only a container
        # that still runs and could not be signalled is an error.
        if done.returncode != 0 and self.status() == "running":
            raise ContainerError(f"runc kill {self.id} {sig.name}: {done.stderr.strip()}")

    def stop(self, grace: float) -> Result:
        """SIGTERM, then SIGKILL if the container still runs after ``grace`` seconds (as the kubelet
        stops a container at the end of its termination grace period)."""
        if self.running():
            self.kill(signal.SIGTERM)
            try:
                return self.wait(grace)
            except subprocess.TimeoutExpired:
                log.info("container %s still runs after its %.0f s grace period: SIGKILL", self.id, grace)
                self.kill(signal.SIGKILL)
        return self.wait(30)

    def delete(self) -> None:
        """Remove the container (its process, state and cgroup) and its bundle."""
        if self.running():
            self._runc("kill", self.id, "KILL")
            if self._proc is not None:
                self._proc.wait(30)
        done = self._runc("delete", "--force", self.id)
        if done.returncode != 0 and "does not exist" not in done.stderr:
            log.warning("runc delete %s: %s", self.id, done.stderr.strip())
        shutil.rmtree(self.bundle, ignore_errors=True)

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def remove_all(state_dir: Path) -> list[str]:
    """Delete every container runc knows under ``state_dir`` (what an agent that was killed left
    running: without its ``runc run`` parent a container lives on) and their bundles."""
    runc_root = state_dir / "runc"
    if not runc_root.is_dir():
        return []
    listed = subprocess.run([RUNC, "--root", str(runc_root), "list", "-q"], capture_output=True, text=True, timeout=60)
    removed = [cid for cid in listed.stdout.split() if cid]
    for cid in removed:
        subprocess.run([RUNC, "--root", str(runc_root), "delete", "--force", cid], capture_output=True, timeout=60)
        shutil.rmtree(state_dir / "bundles" / cid, ignore_errors=True)
    return removed


def run(image: Image, spec: ContainerSpec, *, timeout: float = 120.0, state_dir: Path | None = None) -> Result:
    """Run a container to completion and return how it ended; SIGKILL after ``timeout`` seconds."""
    with Container(image, spec, state_dir=state_dir) as container:
        try:
            return container.wait(timeout)
        except subprocess.TimeoutExpired:
            container.kill(signal.SIGKILL)
            return container.wait(30)
