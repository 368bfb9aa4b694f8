"""Signed model card links: the link on a card opens in a clinician's browser without a JWT.

Discovery and the model card need a CDS client JWT, and a browser that follows a card's link
has none. So the link the router puts on a card it issues (to an authenticated client) is a
capability for that one page:

    {baseUrl}/cds-services/{id}/model-card?version=<v>&expires=<unix s>&sig=<hex>

`sig` is HMAC-SHA256, under a key only the serving party holds (`load_link_key`: a 0600 file in
the hub's or the node's home, used for nothing else), over the service id, the version and the
expiry. A link opens that version's card of that service until it expires; changing any of the
three breaks the signature. It names no patient: every card a version issues in the same second
links the same URL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from aipipe.errors import AuthError, IdentityError
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.secure.keyfiles import file_label, read_private, write_private

LINK_KEY_BYTES = 32
DEFAULT_LIFETIME_S = 24 * 3600.0
_LABEL = "aipipe-cds-model-card-link/v1"
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_WHAT = "CDS model card link key"


@dataclass(frozen=True)
class CardLinkSigner:
    """Signs and checks model card links; `lifetime_s` is how long an issued link opens."""

    key: bytes
    lifetime_s: float = DEFAULT_LIFETIME_S

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("a model card link key must be at least 16 secret bytes")
        if not self.lifetime_s > 0:
            raise ValueError(f"a model card link lifetime must be > 0 s, not {self.lifetime_s}")

    def query(self, service_id: str, version: str, now: datetime) -> dict[str, str]:
        """The `expires` and `sig` parameters of a link issued at `now`."""
        expires = int(now.timestamp() + self.lifetime_s)
        return {"expires": str(expires), "sig": self._mac(service_id, version, expires)}

    def verify(
        self,
        service_id: str,
        version: str | None,
        expires: str | None,
        sig: str | None,
        now: datetime,
    ) -> int:
        """The link's expiry when it opens at `now`; else `AuthError` saying why not."""
        if version is None or expires is None or sig is None:
            raise AuthError(
                "the model card link lacks its version, expires or sig parameter; open the "
                "link as the card gave it, or present a CDS client JWT"
            )
        if not _EXPIRES.fullmatch(expires) or not _SIG.fullmatch(sig):
            raise AuthError(
                "the model card link is malformed (expires must be unix seconds, sig 64 hex "
                "digits); open the link as the card gave it"
            )
        if not hmac.compare_digest(self._mac(service_id, version, int(expires)), sig):
            raise AuthError(
                "the model card link's signature does not match its service, version and "
                "expiry; open the link as the card gave it"
            )
        if now.timestamp() >= int(expires):
            raise AuthError(
                f"the model card link expired at unix time {expires}; open the card again in "
                "the EHR for a fresh link"
            )
        return int(expires)

    def _mac(self, service_id: str, version: str, expires: int) -> str:
        message = json.dumps([_LABEL, service_id, version, expires]).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()


def load_link_key(path: Path, *, at_rest: AtRest = PLAIN) -> bytes:
    """The link key in `path`, created (32 random bytes, mode 0600; sealed for the file's name
    under `at_rest`) at first use. Two processes that start at once end up with the same key:
    the file appears whole or not at all."""
    if not path.exists():
        spare = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        write_private(spare, secrets.token_bytes(LINK_KEY_BYTES), what=_WHAT, replace=False,
                      at_rest=at_rest, label=file_label(path))  # fmt: skip
        try:
            os.link(spare, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            spare.unlink()
    key = read_private(path, what=_WHAT, at_rest=at_rest)
    if len(key) < LINK_KEY_BYTES:
        raise IdentityError(
            f"{_WHAT} {path} holds {len(key)} bytes, fewer than {LINK_KEY_BYTES}; move it away "
            "and restart to create a new one (links issued so far stop opening)"
        )
    return key
