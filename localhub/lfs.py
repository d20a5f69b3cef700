"""Signed upload links for the LFS batch API.

An upload link is the only credential an LFS PUT carries (the client sends no token to
it), so it names exactly what may be written: the repo, the object's sha256 and size, the
part number for multipart uploads, and an expiry, all under an HMAC with the server's key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from localhub.errors import Forbidden

KEY_FILE = "signing.key"


def load_or_create_key(data_dir: Path) -> bytes:
    """The signing key, kept in the data folder so links stay valid across a restart."""
    path = data_dir / KEY_FILE
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return bytes.fromhex(path.read_text().strip())


@dataclass(frozen=True)
class UploadGrant:
    """What one signed link allows: `kind` is "put" (basic), "part" or "complete" (multipart)."""

    kind: str
    repo_pk: int
    oid: str
    size: int
    part: int
    expires: int

    def message(self) -> bytes:
        return f"{self.kind}:{self.repo_pk}:{self.oid}:{self.size}:{self.part}:{self.expires}".encode()


class LinkSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _signature(self, grant: UploadGrant) -> str:
        return hmac.new(self._key, grant.message(), hashlib.sha256).hexdigest()

    def url(self, base_url: str, grant: UploadGrant) -> str:
        path = f"{base_url}/localhub-lfs/{grant.repo_pk}/{grant.oid}"
        if grant.kind == "part":
            path += f"/part/{grant.part}"
        elif grant.kind == "complete":
            path += "/complete"
        query = urlencode({"size": grant.size, "expires": grant.expires, "sig": self._signature(grant)})
        return f"{path}?{query}"

    def check(self, grant: UploadGrant, signature: str, now: float) -> None:
        """Accept a link only if it was signed for exactly this grant and has not expired.

        Raises:
            Forbidden: wrong signature (tampered oid, size, part or expiry) or expired link.
        """
        if not hmac.compare_digest(self._signature(grant), signature):
            raise Forbidden(
                "Invalid upload link signature: the link was altered or not issued by this server."
            )
        if now > grant.expires:
            raise Forbidden("This upload link has expired; request a new one from the LFS batch API.")
