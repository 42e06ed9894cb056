"""blissdata: unified access to acquisition data, live in Redis or archived in files."""

from .exceptions import (EndOfStream, IndexNoMoreThereError, IndexNotYetThereError,
                         IndexWontBeThereError, NoScanAvailable, RedisUnreachableError,
                         ScanNotFoundError, ScanStateError, SchemaError, StreamError, StreamSealedError)
from .mapping import EXTERNAL_LINK, RAW, SOFT_LINK, STREAM
from .scan import EndReason, Scan, ScanState
from .store import DataStore
from .cursor import CursorGroup, StreamView
from .stream import Stream

__all__ = ["DataStore", "Scan", "ScanState", "EndReason", "Stream", "StreamView",
           "CursorGroup", "EndOfStream", "IndexNoMoreThereError", "IndexNotYetThereError",
           "IndexWontBeThereError", "NoScanAvailable", "RedisUnreachableError", "ScanNotFoundError", "ScanStateError",
           "SchemaError", "StreamError", "StreamSealedError",
           "RAW", "STREAM", "SOFT_LINK", "EXTERNAL_LINK"]
