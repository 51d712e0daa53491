"""Droplet sizes: the slug table and the resources a droplet asks for.

A Droplet names its size either by slug (``spec.size``, e.g. ``s-2vcpu-4gb``) or explicitly
(``spec.resources`` {cpu, memoryMiB, diskGiB}); exactly one of the two. ``resources_for``
turns either form into a :class:`Resources` triple and raises ``ValueError`` with a message a
user can act on when the spec is wrong. Pure: no I/O, no Kubernetes client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Resources", "SIZES", "resources_for"]


@dataclasses.dataclass(frozen=True, slots=True)
class Resources:
    """An amount of host resources: vCPUs, memory in MiB, disk in GiB.

    Used for droplet sizes, host capacity, host allocations and reservations. Supports
    ``+`` and ``-`` component-wise; values may be zero (e.g. an empty host's allocation).
    """

    cpu: int
    memory_mib: int
    disk_gib: int

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu + other.cpu,
            self.memory_mib + other.memory_mib,
            self.disk_gib + other.disk_gib,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu - other.cpu,
            self.memory_mib - other.memory_mib,
            self.disk_gib - other.disk_gib,
        )

    def fits_in(self, free: Resources) -> bool:
        """True if every dimension of ``self`` is at most the same dimension of ``free``."""
        return (
            self.cpu <= free.cpu
            and self.memory_mib <= free.memory_mib
            and self.disk_gib <= free.disk_gib
        )

    @property
    def image_gib(self) -> float:
        """Disk plus memory in GiB: what a migration copies (the completion budget's base)."""
        return self.disk_gib + self.memory_mib / 1024

    def to_dict(self) -> dict[str, int]:
        """The API shape: ``{"cpu": .., "memoryMiB": .., "diskGiB": ..}``."""
        return {"cpu": self.cpu, "memoryMiB": self.memory_mib, "diskGiB": self.disk_gib}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], *, what: str = "resources") -> Resources:
        """Parse the API shape ``{cpu, memoryMiB, diskGiB}`` (all required, integers >= 0).

        Raises ``ValueError`` naming ``what`` and the offending field.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"{what} must be an object with cpu, memoryMiB and diskGiB")
        missing = [k for k in ("cpu", "memoryMiB", "diskGiB") if k not in value]
        if missing:
            raise ValueError(f"{what} is missing {', '.join(missing)}")
        out = []
        for key in ("cpu", "memoryMiB", "diskGiB"):
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{what}.{key} must be an integer, got {v!r}")
            if v < 0:
                raise ValueError(f"{what}.{key} must not be negative, got {v}")
            out.append(v)
        return cls(*out)


ZERO = Resources(0, 0, 0)

#: The size slugs of docs/architecture.md (cpu / memory MiB / disk GiB).
SIZES: dict[str, Resources] = {
    "s-1vcpu-512mb-10gb": Resources(1, 512, 10),
    "s-1vcpu-1gb": Resources(1, 1024, 25),
    "s-1vcpu-2gb": Resources(1, 2048, 50),
    "s-2vcpu-2gb": Resources(2, 2048, 60),
    "s-2vcpu-4gb": Resources(2, 4096, 80),
    "s-4vcpu-8gb": Resources(4, 8192, 160),
    "s-8vcpu-16gb": Resources(8, 16384, 320),
}

# Bounds of Droplet.spec.resources in crds/droplets.ferry.dev.yaml.
_MIN = {"cpu": 1, "memoryMiB": 64, "diskGiB": 1}
_MAX = {"cpu": 256}


def resources_for(size: str | None, resources: Mapping[str, Any] | None) -> Resources:
    """The resources of a droplet from ``spec.size`` or ``spec.resources`` (exactly one).

    >>> resources_for("s-2vcpu-4gb", None)
    Resources(cpu=2, memory_mib=4096, disk_gib=80)
    >>> resources_for(None, {"cpu": 3, "memoryMiB": 3072, "diskGiB": 40})
    Resources(cpu=3, memory_mib=3072, disk_gib=40)

    Raises ``ValueError`` when both or neither are given, the slug is unknown (the message
    lists the known slugs), or an explicit field is missing, not an integer or out of the
    bounds of the CRD (cpu 1..256, memoryMiB >= 64, diskGiB >= 1).
    """
    if size is not None and resources is not None:
        raise ValueError(
            "set exactly one of spec.size or spec.resources, not both "
            f"(size={size!r}, resources={dict(resources)!r})"
        )
    if size is None and resources is None:
        raise ValueError(
            "set exactly one of spec.size (a slug such as s-2vcpu-4gb) or spec.resources "
            "{cpu, memoryMiB, diskGiB}"
        )
    if size is not None:
        if not isinstance(size, str):
            raise ValueError(f"spec.size must be a string slug, got {size!r}")
        try:
            return SIZES[size]
        except KeyError:
            raise ValueError(
                f"unknown size {size!r}; known sizes: {', '.join(SIZES)}"
            ) from None
    parsed = Resources.from_dict(resources, what="spec.resources")  # type: ignore[arg-type]
    for key, value in zip(("cpu", "memoryMiB", "diskGiB"), (parsed.cpu, parsed.memory_mib, parsed.disk_gib)):
        if value < _MIN[key]:
            raise ValueError(f"spec.resources.{key} must be at least {_MIN[key]}, got {value}")
        if key in _MAX and value > _MAX[key]:
            raise ValueError(f"spec.resources.{key} must be at most {_MAX[key]}, got {value}")
    return parsed
