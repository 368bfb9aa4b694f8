"""CKKS (TenSEAL) for the `ckks` mode: nodes encrypt, the hub adds with a public context only.

Parameters (HomomorphicEncryption.org Security Standard v1.1, Albrecht et al. 2018, ePrint
2019/939: classical 128-bit security with ternary secrets, which SEAL samples, allows
log2 q ≤ 27, 54, 109, 218, 438, 881 for N = 1024 … 32768; SEAL's own default tables match).
Default N = 8192 with coefficient moduli [60, 60] (120 ≤ 218 bits) and scale 2^40, as measured
in DESIGN §7:

- slots = N/2 = 4096 values per ciphertext; a model of d values takes ⌈d/4096⌉ ciphertexts;
- one data prime (the last prime is SEAL's special prime): no multiplication is ever needed, the
  hub only adds, so no level is spent. Values of a *sum* must stay below 2^(60−40−2) = 2^18 in
  magnitude (SEAL refuses to encode ≥ 2^19; a sum past it wraps), ample for clipped updates;
- error: measured here |error| ≤ 2^9.7 / 2^40 for one fresh ciphertext and ~5e-9 for a sum of
  50; `error_bound` promises n · 2^11 / 2^scale (`NOISE_BITS`), 1.9e-7 for n = 100;
- symmetric encryption: only holders of the secret key (the nodes) can encrypt, so the hub
  cannot inject a ciphertext of its own; it is also 3× faster than public-key encryption here.
  Bytes are 8× float32 either way (131 kB per 4096 values).

`choose_ckks_params` (what a study's key ceremony uses) picks the cheapest parameters that hold
the sum's range at the precision asked for. Bytes per value are set by the number of data primes,
not by N (32 B per value, 8× float32, for one data prime, at N = 4096 or 8192 alike), so it
tries N = 4096 with [60, 49] first (109 ≤ 109 bits; half the bytes of the smallest N = 8192
update, which matters for small models: one 65 kB ciphertext instead of 131 kB, and half the
padding of the last ciphertext for large ones), then N = 8192 with [60, 60], and widens the
data modulus to [60, 40, 60] or [60, 60, 60] (2–3× bytes) when the range or precision does not
fit one 60-bit prime. Measured at N = 4096, [60, 49], scale 2^37: |error| 8e-9 on a sum of 4
values in ±10.

A context carries a random 16-byte id; its fingerprint is SHA-256 of the public envelope
(id, parameters, TenSEAL public bytes, which serialise identically after a round trip). Every
ciphertext carries the fingerprint of the context it was made under. Two contexts with equal
parameters produce ciphertexts TenSEAL happily adds (garbage after decryption), so the
fingerprint is what refuses them; TenSEAL's own errors refuse other parameters.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aipipe.errors import SignatureError
from aipipe.secure._framing import frame
from aipipe.secure.errors import CkksContextError, SealedBoxError
from aipipe.secure.identity import Identity, verify_signature
from aipipe.secure.sealedbox import open_sealed, seal

HE_STANDARD_MAX_LOG_Q_128: Final[Mapping[int, int]] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
NOISE_BITS: Final = 11
_MAX_PRIME_BITS = 60  # SEAL's limit for one coefficient modulus prime
_CANDIDATES: Final = (
    (4096, (60, 49)),
    (8192, (60, 60)),
    (8192, (60, 40, 60)),
    (8192, (60, 60, 60)),
)
_CTX_MAGIC = b"AIPK\x01"
_VEC_MAGIC = b"AIPC\x01"
_PUBLIC, _SECRET = 0, 1
_SEAL_LABEL = b"aipipe/ckks/sealed-context/v1"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CkksParams:
    """Ring degree N, coefficient modulus primes (bits; the last is the special prime), scale."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        limit = HE_STANDARD_MAX_LOG_Q_128.get(n)
        if limit is None:
            raise CkksContextError(
                f"N={n} is not in the HE standard table {sorted(HE_STANDARD_MAX_LOG_Q_128)}"
            )
        if sum(bits) > limit:
            raise CkksContextError(
                f"log2 q = {sum(bits)} > {limit} for N={n}: below 128-bit security "
                "(HomomorphicEncryption.org standard); use fewer or smaller primes, or a larger N"
            )
        if len(bits) < 2 or not all(20 <= b <= _MAX_PRIME_BITS for b in bits):
            raise CkksContextError(f"coefficient moduli {bits}: need ≥ 2 primes of 20–60 bits")
        if self.log2_max_abs < 1:
            raise CkksContextError(f"scale 2^{self.scale_bits} leaves no room in {bits}")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def log2_max_abs(self) -> int:
        """log2 of the largest |value| a sum may reach: data bits − scale − 2 (sign, margin)."""
        return sum(self.coeff_mod_bit_sizes[:-1]) - self.scale_bits - 2

    def error_bound(self, n: int) -> float:
        """Absolute error per value of a decrypted sum of n fresh ciphertexts (measured bound)."""
        return n * 2.0 ** (NOISE_BITS - self.scale_bits)


def choose_ckks_params(*, max_abs_sum: float, precision: float, n_max: int) -> CkksParams:
    """Cheapest parameters whose sum range covers `max_abs_sum` with `precision` error."""
    scale_bits = math.ceil(NOISE_BITS + math.log2(n_max) + math.log2(1 / precision))
    need = math.ceil(math.log2(max(max_abs_sum, 1.0)))
    for degree, bits in _CANDIDATES:
        if scale_bits <= _MAX_PRIME_BITS - 2 and sum(bits[:-1]) - scale_bits - 2 >= need:
            return CkksParams(degree, bits, max(scale_bits, 20))
    raise CkksContextError(
        f"no 128-bit CKKS parameters give |sum| ≤ {max_abs_sum:g} with error ≤ {precision:g} "
        f"for {n_max} summands; clip harder or ask for less precision"
    )


@dataclass(frozen=True)
class EncryptedVector:
    """A flat float vector as ⌈length/slots⌉ serialized CKKS vectors, tagged with its context."""

    fingerprint: bytes
    length: int
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    def to_bytes(self) -> bytes:
        head = _VEC_MAGIC + self.fingerprint + struct.pack(">QI", self.length, len(self.chunks))
        return head + b"".join(struct.pack(">I", len(c)) + c for c in self.chunks)

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedVector:
        try:
            if data[:5] != _VEC_MAGIC:
                raise ValueError("bad magic")
            fingerprint, (length, count), pos = data[5:37], struct.unpack(">QI", data[37:49]), 49
            chunks = []
            for _ in range(count):
                (size,) = struct.unpack(">I", data[pos : pos + 4])
                chunks.append(data[pos + 4 : pos + 4 + size])
                pos += 4 + size
            if pos != len(data) or any(not c for c in chunks):
                raise ValueError("truncated")
        except (ValueError, struct.error) as exc:
            raise CkksContextError(f"not an aipipe CKKS ciphertext: {exc}") from exc
        return cls(fingerprint, length, tuple(chunks))


class CkksContext:
    """A TenSEAL CKKS context: secret (nodes: encrypt, decrypt) or public (hub: add only)."""

    def __init__(self, context: ts.Context, params: CkksParams, context_id: bytes) -> None:
        self._ctx = context
        self.params = params
        self._id = context_id
        self.fingerprint = hashlib.sha256(self.public_bytes()).digest()

    @classmethod
    def generate(cls, params: CkksParams | None = None) -> CkksContext:
        p = params or CkksParams()
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
        ctx.global_scale = 2.0**p.scale_bits
        return cls(ctx, p, os.urandom(16))

    @property
    def tenseal(self) -> ts.Context:
        """The underlying TenSEAL context (for diagnostics and tests)."""
        return self._ctx

    @property
    def is_private(self) -> bool:
        return bool(self._ctx.is_private())

    def _envelope(self, kind: int) -> bytes:
        body: bytes = self._ctx.serialize(
            save_public_key=False,
            save_secret_key=kind == _SECRET,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        p = self.params
        head = struct.pack(
            ">BIBB", kind, p.poly_modulus_degree, p.scale_bits, len(p.coeff_mod_bit_sizes)
        )
        return _CTX_MAGIC + self._id + head + bytes(p.coeff_mod_bit_sizes) + body

    def public_bytes(self) -> bytes:
        """Parameters and id only: enough to add ciphertexts, not to encrypt or decrypt."""
        return self._envelope(_PUBLIC)

    def secret_bytes(self) -> bytes:
        """Includes the secret key: never store or send it unsealed."""
        self._require_private("serialize the secret key")
        return self._envelope(_SECRET)

    def public(self) -> CkksContext:
        return CkksContext.from_bytes(self.public_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> CkksContext:
        try:
            if data[:5] != _CTX_MAGIC:
                raise ValueError("bad magic")
            context_id = data[5:21]
            kind, n, scale_bits, count = struct.unpack(">BIBB", data[21:28])
            bits = tuple(data[28 : 28 + count])
            context = ts.context_from(data[28 + count :])
        except (ValueError, RuntimeError, struct.error) as exc:
            raise CkksContextError(f"not an aipipe CKKS context: {exc}") from exc
        if (kind == _SECRET) != bool(context.is_private()):
            raise CkksContextError("context envelope and TenSEAL bytes disagree on the secret key")
        return cls(context, CkksParams(n, bits, scale_bits), context_id)

    def _require_private(self, what: str) -> None:
        if not self.is_private:
            raise CkksContextError(
                f"a public CKKS context cannot {what}; only key-holding nodes can"
            )

    def _load(self, vector: EncryptedVector) -> list[ts.CKKSVector]:
        if vector.fingerprint != self.fingerprint:
            raise CkksContextError(
                f"ciphertext made under context {vector.fingerprint.hex()[:12]}…, not this "
                f"study's {self.fingerprint.hex()[:12]}…; refusing to mix contexts"
            )
        expected = math.ceil(vector.length / self.params.slots)
        if len(vector.chunks) != expected:
            raise CkksContextError(f"{len(vector.chunks)} ciphertexts for {vector.length} values")
        try:
            loaded = [ts.ckks_vector_from(self._ctx, chunk) for chunk in vector.chunks]
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CkksContextError(
                f"TenSEAL refuses the ciphertext for this context: {exc}"
            ) from exc
        sizes = [v.size() for v in loaded]
        if sum(sizes) != vector.length:
            raise CkksContextError(
                f"ciphertexts hold {sum(sizes)} values, header says {vector.length}"
            )
        return loaded

    def _pack(self, vectors: list[ts.CKKSVector], length: int) -> EncryptedVector:
        return EncryptedVector(self.fingerprint, length, tuple(v.serialize() for v in vectors))

    def encrypt(self, values: npt.ArrayLike) -> EncryptedVector:
        self._require_private("encrypt (symmetric CKKS)")
        x = np.asarray(values, dtype=np.float64).ravel()
        limit = 2.0**self.params.log2_max_abs
        if x.size == 0 or not np.all(np.isfinite(x)) or np.max(np.abs(x)) > limit:
            raise CkksContextError(f"values must be finite, non-empty and within ±{limit:g}")
        step = self.params.slots
        chunks = [ts.ckks_vector(self._ctx, x[i : i + step]) for i in range(0, x.size, step)]
        return self._pack(chunks, x.size)

    def add(self, a: EncryptedVector, b: EncryptedVector) -> EncryptedVector:
        """a + b slot-wise; works with the public context (the hub's)."""
        if a.length != b.length:
            raise CkksContextError(f"cannot add ciphertexts of {a.length} and {b.length} values")
        left, right = self._load(a), self._load(b)
        for x, y in zip(left, right, strict=True):
            x.add_(y)
        return self._pack(left, a.length)

    def decrypt(self, vector: EncryptedVector) -> FloatArray:
        self._require_private("decrypt")
        parts = [np.asarray(v.decrypt(), dtype=np.float64) for v in self._load(vector)]
        return np.concatenate(parts)


class CkksSum:
    """Streaming Σ of ciphertexts at the hub: O(model) memory, one deserialization per input."""

    def __init__(self, context: CkksContext) -> None:
        self._context = context
        self._acc: list[ts.CKKSVector] = []
        self._length = 0
        self.count = 0

    def add(self, vector: EncryptedVector) -> None:
        loaded = self._context._load(vector)
        if not self._acc:
            self._acc, self._length = loaded, vector.length
        elif vector.length != self._length:
            raise CkksContextError(f"ciphertext of {vector.length} values, sum has {self._length}")
        else:
            for x, y in zip(self._acc, loaded, strict=True):
                x.add_(y)
        self.count += 1

    def result(self) -> EncryptedVector:
        if not self._acc:
            raise CkksContextError("no ciphertext was added to the sum")
        return self._context._pack(self._acc, self._length)


def sum_encrypted(context: CkksContext, vectors: Iterable[EncryptedVector]) -> EncryptedVector:
    total = CkksSum(context)
    for vector in vectors:
        total.add(vector)
    return total.result()


@dataclass(frozen=True)
class SealedContext:
    """A secret context sealed to one node, signed by the node that generated it."""

    study_id: str
    recipient_id: str
    fingerprint: bytes
    sealed: bytes
    signature: bytes

    def signing_bytes(self) -> bytes:
        """What the sender signs: study, recipient, fingerprint and the sealed box."""
        return frame(_SEAL_LABEL, self.study_id, self.recipient_id, self.fingerprint, self.sealed)


def _seal_ad(study_id: str, recipient_id: str, fingerprint: bytes) -> bytes:
    return frame(_SEAL_LABEL, study_id, recipient_id, fingerprint)


def seal_context(
    context: CkksContext,
    *,
    study_id: str,
    recipient_id: str,
    recipient_public_key: bytes,
    sender: Identity,
) -> SealedContext:
    """The secret context in a sealed box for `recipient_id`'s X25519 key, signed by `sender`.

    The box binds (study, recipient, fingerprint) as associated data; the signature lets the
    recipient check that the context comes from the generating node, not from the hub.
    """
    ad = _seal_ad(study_id, recipient_id, context.fingerprint)
    box = seal(
        context.secret_bytes(), recipient_public_key=recipient_public_key, associated_data=ad
    )
    unsigned = SealedContext(study_id, recipient_id, context.fingerprint, box, b"")
    return SealedContext(
        study_id, recipient_id, context.fingerprint, box, sender.sign(unsigned.signing_bytes())
    )


def open_context(
    sealed: SealedContext,
    *,
    study_id: str,
    recipient_id: str,
    recipient_key: X25519PrivateKey,
    sender_public_key: bytes,
) -> CkksContext:
    """The secret context, if sealed for this study and recipient and signed by the sender."""
    if (sealed.study_id, sealed.recipient_id) != (study_id, recipient_id):
        raise SealedBoxError(
            f"context sealed for {sealed.recipient_id!r} in study {sealed.study_id!r}, "
            f"not for {recipient_id!r} in {study_id!r}"
        )
    try:
        verify_signature(sender_public_key, sealed.signature, sealed.signing_bytes())
    except SignatureError as exc:
        raise SealedBoxError("sealed context is not signed by the expected node") from exc
    ad = _seal_ad(study_id, recipient_id, sealed.fingerprint)
    context = CkksContext.from_bytes(
        open_sealed(sealed.sealed, recipient_key=recipient_key, associated_data=ad)
    )
    if not context.is_private or context.fingerprint != sealed.fingerprint:
        raise SealedBoxError("sealed context does not match its fingerprint")
    return context
