"""Files the plugin writes (goldens, reports, plots): atomic, with the user's permissions, safe names, JSON that holds every float."""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, flushed to disk, then an atomic rename:
    a crash, a full disk or a concurrent xdist worker never leaves half a file. The file gets the
    mode an ordinary write would give it (an existing file's, else 0666 less the umask), not
    ``mkstemp``'s 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def safe_name(text: str, limit: int | None = None) -> str:
    """A file name from a node id or label: ``test_x[top_k]`` stays readable. Cut at ``limit``
    characters, a name ends in a hash of the whole text, so two long ids never share a file."""
    name = re.sub(r"[^A-Za-z0-9_.,=+\-\[\]]", "_", text)
    if limit is not None and len(name) > limit:
        name = name[: limit - 9] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name


def jsonable(value: Any) -> Any:
    """Floats that JSON can hold (inf/nan as strings), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
