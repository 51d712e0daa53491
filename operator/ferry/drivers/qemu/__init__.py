"""The ``qemu`` driver: a real QEMU process per droplet, migrated the way libvirt does
(NBD + blockdev-mirror for the disk, pre-copy with auto-converge for memory,
pause-before-switchover as the last safe abort point). See driver.py and migration.py."""

from .config import QemuConfig
from .driver import QemuDriver

__all__ = ["QemuConfig", "QemuDriver"]
