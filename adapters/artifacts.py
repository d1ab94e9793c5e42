"""Content-addressed artifact store: patches, transcripts, context documents and logs live here,
and only a reference travels through workflow history.

Local directory in the embedded mode; a bucket implementation would keep the same interface.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from conveyor.models import ArtifactRef

SCHEME = "cas:sha256:"


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root

    def _path(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest[2:]

    def put(self, data: bytes) -> ArtifactRef:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():  # content-addressed: a retried activity writes the same blob once
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        return ArtifactRef(uri=SCHEME + digest, size=len(data), sha256=digest)

    def get(self, ref: ArtifactRef) -> bytes:
        if not ref.uri.startswith(SCHEME):
            raise ValueError(f"not an artifact reference: {ref.uri!r}")
        digest = ref.uri.removeprefix(SCHEME)
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"malformed artifact digest: {ref.uri!r}")
        data = self._path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"artifact {ref.uri} is corrupt")
        return data
