"""The product image, built here without a Docker engine and run as containers by runc.

``hack/build-image.sh`` builds the Dockerfile with buildah from a Debian base assembled here
(cached under ~/.cache/research-operator/image); ``localkube.containers`` runs its export with
runc: read-only root, the image's uid 65532, no capabilities, own pid/ipc/uts/mount namespaces,
cgroup limits. These tests check what a user of the image would notice: the four programs start,
the model server answers on its own IP, a memory limit kills, SIGTERM and the grace period.

Needs root, buildah, debootstrap, runc and ip (``apt-get install buildah debootstrap runc
iproute2``). The first build takes minutes (see docs/development.md), later ones a fraction of a
second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from localkube import containers
from localkube.containers import Container, ContainerSpec, Image, Limits, PodNetwork
from localkube.controlplane import free_port

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "hack" / "build-image.sh"


def _build() -> tuple[Path, float, str]:
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
        env={**os.environ, "IMAGE_BUILDER": "buildah"},
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, f"hack/build-image.sh failed:\n{done.stderr[-4000:]}"
    return Path(done.stdout.strip().splitlines()[-1]), seconds, done.stderr


@pytest.fixture(scope="module")
def image() -> Image:
    missing = [t for t in ("buildah", "debootstrap", "runc", "ip") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"the image tier needs root and {', '.join(missing) or 'nothing else'} "
                    "(apt-get install buildah debootstrap runc iproute2)")
    first, first_s, first_log = _build()
    second, second_s, second_log = _build()
    print(f"\nimage build: first call {first_s:.1f} s ({'cached' if 'cached:' in first_log else 'built'}), "
          f"second call {second_s:.2f} s")
    # The second call must find the first one's result: same export, nothing built.
    assert second == first
    assert "cached:" in second_log and "building" not in second_log
    assert second_s < 10
    return containers.load_image(first)


def test_image_config_is_what_the_dockerfile_says(image: Image) -> None:
    assert image.user == "65532:65532"
    assert image.entrypoint == ("research-operator",)
    assert image.working_dir == "/tmp"
    assert "HOME=/tmp" in image.env
    assert (image.rootfs / "opt/venv/bin/research-worker").is_file()
    # The final stage carries the venv, not the sources or the build's wheel.
    assert not (image.rootfs / "src").exists() and not (image.rootfs / "wheels").exists()
    # The layout for other runtimes: an OCI index naming the tag.
    index = json.loads((image.directory / "oci" / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["0.1.0"]


def test_cache_key_follows_the_inputs_only(image: Image, tmp_path: Path) -> None:
    """A changed source file rebuilds the image; bytecode and egg-info (left out of the build
    context by .dockerignore) do not."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("api", "operator", "worker", "modelserver", "cli"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "hack").mkdir()
    shutil.copy(BUILD_SCRIPT, tmp_path / "hack")

    def key() -> str:
        return subprocess.run(["bash", str(tmp_path / "hack" / "build-image.sh"), "--key"], check=True,
                              stdout=subprocess.PIPE, text=True).stdout.strip()

    original = key()
    assert original == (image.directory / "key").read_text().strip()  # the copy is the built tree
    (tmp_path / "worker" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "worker" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert key() == original
    source = next((tmp_path / "worker").rglob("*.py"))
    source.write_text(source.read_text() + "\n# changed\n")
    assert key() != original


@pytest.mark.parametrize(
    ("program", "usage"),
    [
        ("research-operator", "usage: research-operator"),
        ("research-worker", "usage: research-worker"),
        ("research-modelserver", "usage: research-modelserver"),
        ("kubectl-research", "usage: kubectl research"),
    ],
)
def test_each_program_runs_as_nonroot_on_a_read_only_root(image: Image, program: str, usage: str) -> None:
    script = 'echo "uid=$(id -u) gid=$(id -g)"; touch /opt/venv/probe 2>&1; exec "$0" --help'
    result = containers.run(image, ContainerSpec(command=["sh", "-c", script, program]), timeout=60)
    assert result.exit_code == 0, result.stderr
    assert "uid=65532 gid=65532" in result.stdout
    assert "Read-only file system" in result.stdout
    assert usage in result.stdout


def test_isolation_and_limits_as_configured(image: Image) -> None:
    """Own pid namespace and hostname, no capabilities, the rlimits asked for, a writable /tmp, and
    the cgroup limits runc wrote (read from the host while the container runs)."""
    script = (
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; grep CapEff /proc/self/status; "
        "grep -E 'Max (open files|processes)' /proc/self/limits; "
        "echo data > /tmp/f && cat /tmp/f; sleep 30"
    )
    spec = ContainerSpec(command=["sh", "-c", script], hostname="probe-pod",
                         limits=Limits(memory_bytes=96 << 20, pids=50, cpu_millis=500))
    with Container(image, spec) as container:
        deadline = time.monotonic() + 20
        while "data" not in container.logs()[0] and time.monotonic() < deadline:
            time.sleep(0.1)
        cgroup = Path("/sys/fs/cgroup")
        memory = containers._memory_cgroup_dir(container.cgroups_path)
        assert memory is not None
        limit_file = "memory.limit_in_bytes" if (memory / "memory.limit_in_bytes").exists() else "memory.max"
        assert int((memory / limit_file).read_text()) == 96 << 20
        if (cgroup / "pids").is_dir():  # v1 controllers (this machine); v2 keeps all in one dir
            assert (cgroup / "pids" / container.cgroups_path.lstrip("/") / "pids.max").read_text().strip() == "50"
            assert (cgroup / "cpu" / container.cgroups_path.lstrip("/") / "cpu.cfs_quota_us").read_text().strip() \
                == "50000"
        result = container.stop(grace=5)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sh -c cat /proc/1/cmdline")  # pid 1 is the container's own command
    assert lines[1] == "probe-pod"
    assert lines[2].split() == ["CapEff:", "0000000000000000"]
    assert lines[3].split()[2:4] == ["32768", "32768"] and lines[4].split()[3:5] == ["20000", "20000"]
    assert lines[5] == "data"


def test_fork_beyond_the_pids_limit_fails(image: Image) -> None:
    script = "for i in $(seq 40); do sleep 5 & done 2>&1; wait"
    result = containers.run(image, ContainerSpec(command=["sh", "-c", script], limits=Limits(pids=10)), timeout=60)
    assert "fork" in (result.stdout + result.stderr).lower()


def test_modelserver_answers_on_its_own_ip(image: Image) -> None:
    """The offline model server in a network namespace of its own, reached from the host at the
    container's address over a veth link; the host's IP forwarding is left as it was."""
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with PodNetwork(60) as net:
        spec = ContainerSpec(command=["research-modelserver", "--host", "0.0.0.0", "--port", "8000"],
                             netns=net.path, ip=net.ip, hostname="modelserver")
        with Container(image, spec) as container:
            body = None
            deadline = time.monotonic() + 60
            while body is None and time.monotonic() < deadline and container.running():
                try:
                    with urllib.request.urlopen(f"http://{net.ip}:8000/v1/models", timeout=2) as response:
                        body = json.loads(response.read())
                except OSError:
                    time.sleep(0.2)
            assert body is not None, f"no answer from {net.ip}:8000: {container.logs()[1][-2000:]}"
            assert body["object"] == "list" and "offline-research-1" in [m["id"] for m in body["data"]]
            # The server is not on the host's loopback: it has a network of its own.
            with pytest.raises(OSError):
                urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=2)
            result = container.stop(grace=10)
        assert result.exit_code == 0, result.stderr[-2000:]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward
    assert not Path("/run/netns/ro-60").exists()


def test_over_its_memory_limit_a_container_is_oomkilled(image: Image) -> None:
    allocate = "b = bytearray(b'x') * ({} << 20); print('allocated', len(b) >> 20, 'MiB')"
    limits = Limits(memory_bytes=64 << 20)
    within = containers.run(image, ContainerSpec(command=["python", "-c", allocate.format(16)], limits=limits))
    assert (within.exit_code, within.reason) == (0, "Completed")
    assert "allocated 16 MiB" in within.stdout
    over = containers.run(image, ContainerSpec(command=["python", "-c", allocate.format(300)], limits=limits))
    assert (over.exit_code, over.reason) == (137, "OOMKilled")
    assert "allocated" not in over.stdout


def test_sigterm_ends_a_server_within_its_grace_period(image: Image) -> None:
    spec = ContainerSpec(command=["research-modelserver", "--host", "127.0.0.1", "--port", str(free_port())])
    with Container(image, spec) as container:
        _wait_for_log(container, "Uvicorn running")
        start = time.monotonic()
        result = container.stop(grace=10)
        took = time.monotonic() - start
    assert result.exit_code == 0 and result.reason == "Completed", result.stderr[-2000:]
    assert took < 10
    assert "Shutting down" in result.stderr


def test_a_process_that_ignores_sigterm_is_killed_at_the_end_of_the_grace_period(image: Image) -> None:
    """PID 1 of a pid namespace gets no signal it has no handler for: Python's default SIGTERM
    does nothing there, so only SIGKILL at the end of the grace period stops it (exit 137, not an
    OOM kill)."""
    spec = ContainerSpec(command=["python", "-c", "import time; print('up', flush=True); time.sleep(600)"])
    with Container(image, spec) as container:
        _wait_for_log(container, "up", stream=0)
        start = time.monotonic()
        result = container.stop(grace=2)
        took = time.monotonic() - start
    assert (result.exit_code, result.reason) == (137, "Error")
    assert 2 <= took < 10


def _wait_for_log(container: Container, text: str, stream: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in container.logs()[stream]:
        assert container.running(), f"the container ended: {container.logs()}"
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s: {container.logs()}"
        time.sleep(0.1)


@pytest.fixture(autouse=True, scope="module")
def _own_container_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """This run's containers kept apart from any other run's on the machine (a second checkout's
    tests would otherwise count as this one's leftovers)."""
    root = tmp_path_factory.mktemp("containers-of-this-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(containers, "cache_dir", lambda: root)
        yield


@pytest.fixture(autouse=True)
def _no_leftover_containers() -> Iterator[None]:
    yield
    state = containers.cache_dir() / "containers" / "runc"
    listed = subprocess.run(["runc", "--root", str(state), "list", "-q"], stdout=subprocess.PIPE, text=True)
    assert listed.stdout.split() == [], "a test left a container behind"


def test_a_container_that_cannot_start_is_told_apart_from_one_that_fails(image: Image) -> None:
    with pytest.raises(containers.ContainerError, match=r"did not start.*/no/such/program.*no such file"):
        containers.run(image, ContainerSpec(command=["/no/such/program"]))
    failed = containers.run(image, ContainerSpec(command=["sh", "-c", "echo bad input >&2; exit 3"]))
    assert (failed.exit_code, failed.reason, failed.stderr) == (3, "Error", "bad input\n")
