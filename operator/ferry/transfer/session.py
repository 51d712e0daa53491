"""What the two ends of one migration's data session share: its states, its errors and
the size of the extents it moves.

``ferry.transfer.source`` sends a VM's images, ``ferry.transfer.target`` receives them;
the channel between them is authenticated (``ferry.transfer.auth``) and framed
(``ferry.transfer.framing``).
"""

from __future__ import annotations

from ferry.transfer import framing

# Contiguous dirty blocks are coalesced into extents of up to MAX_EXTENT_BYTES, one frame
# each (the target writes runs of zeros in pieces of the same size).
MAX_EXTENT_BYTES = 1 << 20

# Data sockets block in the kernel, with SO_RCVTIMEO/SO_SNDTIMEO as their timeout, and the
# receiver waits for whole chunks (MSG_WAITALL): Python's timeout mode would poll() before
# every send and recv. (tests/perf/bench_dataplane_ideas.py measures both.)
BLOCKING_IO = True

# states (the values of ferry.drivers.base.MigrationState)
NONE, COPYING, CONVERGING, PAUSED, COMPLETED, RECEIVED, FAILED, ABORTED = (
    "None",
    "Copying",
    "Converging",
    "Paused",
    "Completed",
    "Received",
    "Failed",
    "Aborted",
)
TERMINAL = (COMPLETED, RECEIVED, FAILED, ABORTED)


class MigrationFailed(Exception):
    pass


class Cancelled(Exception):
    pass


def failure_reason(e: BaseException) -> str:
    """The one-line reason an attempt failed with ``e``."""
    text = str(e) or e.__class__.__name__
    if isinstance(e, (OSError, framing.FrameError)) and not isinstance(e, framing.ChecksumError):
        return f"{e.__class__.__name__}: {text}"
    return text
