"""A node's secure-aggregation secrets and records, as mode-0600 files in its home.

<home>/sealing.key                         X25519 key that secret contexts are sealed to
<home>/secure/ckks-<study>.context         the study's secret CKKS context (TenSEAL, with key)
<home>/secure/sent/<study>/round-<n>.safetensors
                                           the plaintext contribution [r, r·Δ] this node masked
                                           or encrypted: the site's own record of what left it,
                                           which no one outside the site ever sees in clear
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aipipe.errors import IdentityError
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.secure.encoding import FloatArray
from aipipe.secure.keyfiles import load_private_pem, pem_bytes, read_private, write_private
from aipipe.secure.sealedbox import x25519_public_bytes
from aipipe.wire.tensors import encode_arrays

if TYPE_CHECKING:
    from aipipe.secure.ckks import CkksContext


class SecureVault:
    def __init__(self, sealing_key: Path, directory: Path, *, at_rest: AtRest = PLAIN) -> None:
        """`at_rest`: how the home's private files rest (every file here is sealed with it)."""
        self.sealing_key_path = sealing_key
        self.directory = directory
        self.at_rest = at_rest

    @staticmethod
    def create_sealing_key(path: Path, *, at_rest: AtRest = PLAIN) -> None:
        """A fresh X25519 key, written once (an existing key is never replaced)."""
        key = pem_bytes(X25519PrivateKey.generate())
        write_private(path, key, what="sealing key", replace=False, at_rest=at_rest)

    def sealing_key(self) -> X25519PrivateKey:
        key = load_private_pem(self.sealing_key_path, what="sealing key", at_rest=self.at_rest)
        if not isinstance(key, X25519PrivateKey):
            raise IdentityError(f"sealing key {self.sealing_key_path} is not an X25519 key")
        return key

    def sealing_public(self) -> bytes:
        return x25519_public_bytes(self.sealing_key())

    def _context_path(self, study: str) -> Path:
        return self.directory / f"ckks-{study}.context"

    def save_context(self, study: str, context: CkksContext) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(self._context_path(study), context.secret_bytes(), what="CKKS context",
                      at_rest=self.at_rest)  # fmt: skip

    def load_context(self, study: str) -> CkksContext | None:
        from aipipe.secure.ckks import CkksContext  # TenSEAL only where CKKS is used

        path = self._context_path(study)
        if not path.exists():
            return None
        return CkksContext.from_bytes(read_private(path, what="CKKS context", at_rest=self.at_rest))

    def record_sent(self, study: str, number: int, contribution: FloatArray) -> Path:
        folder = self.directory / "sent" / study
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"round-{number}.safetensors"
        data = encode_arrays({"x": np.asarray(contribution, dtype=np.float64)})
        write_private(path, data, what="sent contribution", at_rest=self.at_rest)
        return path
