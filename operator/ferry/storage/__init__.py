"""The only code that talks to the Kubernetes API for ferry's own calls (pykube-ng).

kopf watches and patches the objects it handles; everything else (agents, CLI, operator
side effects on other objects) goes through ``ferry.storage.Kube``.
"""

from ferry.storage.kube import Conflict, Kube, NotFound, StorageError

__all__ = ["Conflict", "Kube", "NotFound", "StorageError"]
