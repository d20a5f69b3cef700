"""Content-addressed file bytes: ``blobs/ab/abcdef...`` named by sha256.

A blob only enters the store once its bytes are complete and their sha256 checked, by a
rename from ``tmp/``; so a reader never sees half a file, and a failed upload leaves only
a temporary file behind (removed at once, or at the next start).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from localhub.errors import BadRequest

READ_CHUNK = 8 * 1024 * 1024


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def clear_tmp(self) -> None:
        """Drop leftovers of uploads a crash interrupted; only the server calls it, when it starts."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256[:2] / sha256

    def exists(self, sha256: str, size: int | None = None) -> bool:
        path = self.path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def temp_path(self, prefix: str = "up") -> Path:
        return self.tmp_dir / f"{prefix}-{uuid.uuid4().hex}"

    def put_bytes(self, data: bytes) -> str:
        """Store `data`; return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256, len(data)):
            tmp = self.temp_path()
            tmp.write_bytes(data)
            self._install(tmp, sha256)
        return sha256

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Move a finished temporary file, whose sha256 the caller checked, into the store."""
        if self.exists(sha256):
            tmp.unlink(missing_ok=True)
            return
        self._install(tmp, sha256)

    def adopt_verified(self, tmp: Path, sha256: str, size: int) -> None:
        """Hash a finished temporary file and adopt it if it is the expected content.

        Raises:
            BadRequest: its size or sha256 differ from what the upload announced.
        """
        actual_size = tmp.stat().st_size
        digest = hashlib.sha256()
        with tmp.open("rb") as f:
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
        if actual_size != size or digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise BadRequest(
                f"Uploaded content does not match: expected sha256 {sha256} and {size} bytes, "
                f"got sha256 {digest.hexdigest()} and {actual_size} bytes."
            )
        self.adopt(tmp, sha256)

    def _install(self, tmp: Path, sha256: str) -> None:
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()
