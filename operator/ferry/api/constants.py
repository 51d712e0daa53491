"""Names shared by every ferry component (see docs/architecture.md)."""

GROUP = "ferry.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

HOST_LABEL = "ferry.dev/host"
SOURCE_HOST_LABEL = "ferry.dev/source-host"
TARGET_HOST_LABEL = "ferry.dev/target-host"
DROPLET_LABEL = "ferry.dev/droplet"
EVACUATION_LABEL = "ferry.dev/evacuation"
EVACUATION_WINDOW_LABEL = "ferry.dev/evacuation-window"

MAINTENANCE_ANNOTATION = "ferry.dev/maintenance-event"
MAINTENANCE_SINCE_ANNOTATION = "ferry.dev/maintenance-event-since"
MAINTENANCE_NOT_BEFORE_ANNOTATION = "ferry.dev/maintenance-event-not-before"
MAINTENANCE_EVENT = "live_migrate"

FINALIZER = "ferry.dev/migration"
TRANSFER_SECRET_KEY = "key"

#: the reason of a migration whose copies differed after the record moved (qemu's frozen point,
#: checked after the resume): the source keeps its paused copy until the user decides
VERIFICATION_FAILED = "VerificationFailed"


def transfer_secret_name(migration: str) -> str:
    return f"{migration}-transfer"
