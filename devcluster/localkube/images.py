"""Container images, as the node agent understands them: a name that maps to a local command.

The agent pulls no images and has no container runtime. A container runs as a local process
with ``command`` + ``args`` from the pod spec, resolved on ``PATH`` (the project's virtualenv
``bin`` first). The image name matters only when the container has no ``command``: then the
image's default ENTRYPOINT/CMD come from :data:`IMAGE_DEFAULTS`, keyed by the last path
component of the image repository (``ghcr.io/acme/research-worker:0.3`` -> ``research-worker``).

Kubernetes' rules for combining them (as for a real image):

- ``command`` set: it replaces ENTRYPOINT and the image CMD is ignored; ``args`` follow.
- only ``args`` set: ENTRYPOINT + ``args``.
- neither: ENTRYPOINT + CMD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageDefaults:
    """What an image would run when the pod gives no ``command``."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


IMAGE_DEFAULTS: dict[str, ImageDefaults] = {
    # This project's images: each is the same virtualenv, entered through its console script.
    "research-operator": ImageDefaults(entrypoint=("research-operator",)),
    "research-worker": ImageDefaults(entrypoint=("research-worker",)),
    "research-modelserver": ImageDefaults(entrypoint=("research-modelserver",)),
    # Public base images used by tests and examples.
    "python": ImageDefaults(cmd=("python3",)),
    "busybox": ImageDefaults(cmd=("sh",)),
    "alpine": ImageDefaults(cmd=("/bin/sh",)),
    "debian": ImageDefaults(cmd=("bash",)),
    "ubuntu": ImageDefaults(cmd=("/bin/bash",)),
}


class ImageNotMapped(Exception):
    """The container has no command and its image is not in :data:`IMAGE_DEFAULTS`."""


def image_repository(image: str) -> str:
    """The repository's last path component: registry, tag and digest removed.

    >>> image_repository("ghcr.io/acme/research-worker:0.3@sha256:abcd")
    'research-worker'
    """
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def container_argv(container: Mapping[str, Any]) -> list[str]:
    """The unexpanded argv a container runs (``$(VAR)`` references are expanded later).

    Raises :class:`ImageNotMapped` when the argv depends on an image this table does not know.
    """
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if command:
        return command + args
    image = str(container.get("image") or "")
    defaults = IMAGE_DEFAULTS.get(image_repository(image))
    if defaults is None:
        known = ", ".join(sorted(IMAGE_DEFAULTS))
        raise ImageNotMapped(
            f"image {image!r} has no local entry point and the container sets no command; "
            f"set command, or use one of the mapped images ({known})"
        )
    argv = list(defaults.entrypoint) + (args or list(defaults.cmd))
    if not argv:
        raise ImageNotMapped(f"image {image!r} has neither an entry point nor a default command")
    return argv
