"""File-system errors in a few words, and telling them from other errors."""

from __future__ import annotations

import errno
import os
import re



def os_reason(exc: BaseException) -> str:
    """A file error in the system's few words (HDF5's own messages run over several lines).

    h5py raises OSError for most file errors but RuntimeError for some (a failed flush), with
    the errno only inside the message ("errno = 28"); both are understood."""
    code = getattr(exc, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full ({os.strerror(code)})"
    if code:
        return os.strerror(code)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__



def is_file_error(exc: BaseException) -> bool:
    """An error from the file system: an OSError, or h5py's RuntimeError carrying an errno."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "errno = " in str(exc))
