"""The OCI runtime config localkube.containers gives runc, checked without running anything
(tests/test_image.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from localkube.containers import ContainerSpec, Image, Limits, container_argv, runtime_spec

IMAGE = Image(
    directory=Path("/cache/image/research-operator-0123"),
    entrypoint=("research-operator",),
    cmd=("--verbose",),
    env=("PATH=/opt/venv/bin:/usr/bin", "HOME=/tmp"),
    user="65532:65532",
    working_dir="/tmp",
)
BUNDLE = Path("/cache/containers/bundles/ro-1")


def test_command_and_args_follow_kubernetes_rules_over_entrypoint_and_cmd() -> None:
    assert container_argv(IMAGE, (), ()) == ["research-operator", "--verbose"]
    assert container_argv(IMAGE, (), ("--help",)) == ["research-operator", "--help"]
    assert container_argv(IMAGE, ("research-worker",), ()) == ["research-worker"]  # Cmd dropped
    assert container_argv(IMAGE, ("sh", "-c"), ("echo hi",)) == ["sh", "-c", "echo hi"]
    bare = Image(IMAGE.directory, (), (), (), "0", "/")
    with pytest.raises(ValueError, match="neither Entrypoint nor Cmd"):
        container_argv(bare, (), ())


def test_the_image_user_on_a_read_only_root_without_capabilities() -> None:
    config = runtime_spec(IMAGE, ContainerSpec(), BUNDLE, "/research-operator/ro-1")
    assert config["root"] == {"path": "/cache/image/research-operator-0123/rootfs", "readonly": True}
    process = config["process"]
    assert process["user"] == {"uid": 65532, "gid": 65532, "additionalGids": [65532]}
    assert process["noNewPrivileges"] is True
    assert all(caps == [] for caps in process["capabilities"].values())
    assert process["cwd"] == "/tmp"
    assert {"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000} in process["rlimits"]
    assert {"type": "RLIMIT_NPROC", "hard": 32768, "soft": 32768} in process["rlimits"]
    tmp = next(m for m in config["mounts"] if m["destination"] == "/tmp")
    assert tmp["type"] == "tmpfs" and f"size={64 << 20}" in tmp["options"]
    hosts = next(m for m in config["mounts"] if m["destination"] == "/etc/hosts")
    assert hosts["source"] == str(BUNDLE / "hosts") and "ro" in hosts["options"]


def test_user_env_namespaces_and_limits_from_the_spec() -> None:
    spec = ContainerSpec(
        command=("research-modelserver",), env={"HOME": "/work", "MODELSERVER_PORT": "8000"}, user="1000:2000",
        limits=Limits(memory_bytes=256 << 20, pids=100, cpu_millis=1500), netns=Path("/run/netns/ro-3"),
        hostname="modelserver-0",
    )
    config = runtime_spec(IMAGE, spec, BUNDLE, "/research-operator/ro-1")
    assert config["process"]["user"]["uid"] == 1000 and config["process"]["user"]["gid"] == 2000
    # The spec's variables override the image's; the rest of the image's stay.
    assert config["process"]["env"] == [
        "PATH=/opt/venv/bin:/usr/bin", "HOME=/work", "HOSTNAME=modelserver-0", "MODELSERVER_PORT=8000",
    ]
    assert config["hostname"] == "modelserver-0"
    linux = config["linux"]
    assert {"type": "network", "path": "/run/netns/ro-3"} in linux["namespaces"]
    assert [n["type"] for n in linux["namespaces"][:4]] == ["pid", "ipc", "uts", "mount"]
    assert linux["cgroupsPath"] == "/research-operator/ro-1"
    assert linux["resources"]["memory"] == {"limit": 256 << 20}
    assert linux["resources"]["pids"] == {"limit": 100}
    assert linux["resources"]["cpu"] == {"quota": 150_000, "period": 100_000}


def test_the_host_network_unless_a_namespace_is_named_and_no_limits_unless_asked() -> None:
    config = runtime_spec(IMAGE, ContainerSpec(), BUNDLE, "/research-operator/ro-1")
    assert "network" not in [n["type"] for n in config["linux"]["namespaces"]]
    assert set(config["linux"]["resources"]) == {"devices"}


def test_a_user_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not numeric"):
        runtime_spec(IMAGE, ContainerSpec(user="nobody"), BUNDLE, "/research-operator/ro-1")
