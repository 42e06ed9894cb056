"""Why writing one scan stops: the exceptions the scan's stages raise and its life catches."""

from __future__ import annotations

#: why a scan whose keys vanished mid-write ends (the writer cannot tell which)
SCAN_GONE = "scan gone from Redis: deleted, or Redis restarted without its data"


class ScanFailed(Exception):
    """This scan cannot be written; the message says why (shown to users as is)."""


class WriterStopping(Exception):
    """The service is stopping: flush, leave the scan "writing" so a restart resumes it."""
