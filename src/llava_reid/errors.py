"""Which failures of a stage are expected (bad input, a missing or corrupt file, an unreachable
answerer, a full disk) and the one line that says so.

The CLI prints that line instead of a traceback (``--verbose`` adds the traceback); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

from llava_reid.answerer.base import AnswererError
from llava_reid.artifacts import ArtifactError, ArtifactWriteError
from llava_reid.config import ConfigError
from llava_reid.data.annotations import AnnotationError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def expected_message(exc: BaseException) -> str | None:
    """The message of an expected failure, or None for one that is a bug."""
    if isinstance(exc, ConfigError | ArtifactError | ArtifactWriteError | AnnotationError
                  | AnswererError):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename or ""
        if exc.errno in _DISK_FULL:
            return f"{where or 'writing'}: the disk is full ({exc.strerror or exc})"
        if exc.errno is not None and exc.strerror:
            return f"{where}: {exc.strerror}" if where else exc.strerror
        return str(exc)  # the stages raise FileNotFoundError(f"{path}: ...") with a message
    return None

