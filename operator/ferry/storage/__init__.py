"""The only code that talks to the Kubernetes API for ferry's own calls (pykube-ng).

kopf watches and patches the objects it handles; everything else (agents, CLI, the metadata
endpoint, operator side effects on other objects) goes through ``ferry.storage.Kube``.
``storage.watch.Reflector`` is the one list/watch loop; ``storage.backoff.Backoff`` the one
retry schedule.
"""

from ferry.storage.backoff import Backoff
from ferry.storage.kube import Conflict, Forbidden, Gone, Kube, ListWatch, NotFound, StorageError

__all__ = ["Backoff", "Conflict", "Forbidden", "Gone", "Kube", "ListWatch", "NotFound", "StorageError"]
