"""Droplet addresses: one normal form, and one rule for who owns an address two droplets claim.

The metadata endpoint identifies the droplet that asks by its source address, so an address
must belong to one droplet. When two claim the same one, the OLDEST claim owns it
(creationTimestamp, then namespace, then name), whatever order the events arrive in: the
endpoint answers for the owner only, and the operator flags every other claimant with the
``AddressConflict`` condition and a Warning Event (docs/architecture.md, "Addresses").
"""

from __future__ import annotations

import ipaddress


def normalize_ip(value: object) -> str | None:
    """Canonical text of an IP address, IPv4-mapped IPv6 folded to IPv4; None if invalid."""
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        addr = ipaddress.ip_address(value.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def claim_order(created: str, namespace: str, name: str) -> tuple[str, str, str]:
    """Sort key of a claim on an address: the smallest owns it. ``created`` is the RFC 3339
    creationTimestamp (sorts as text); a missing one sorts last, so a droplet of unknown age
    never wins a conflict."""
    return (created or "~", namespace, name)
