"""CKKS: the hub sums with a public context, only key holders decrypt, contexts never mix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from aipipe.secure.ckks import (
    HE_STANDARD_MAX_LOG_Q_128,
    CkksContext,
    CkksParams,
    CkksSum,
    EncryptedVector,
    choose_ckks_params,
    open_context,
    seal_context,
    sum_encrypted,
)
from aipipe.secure.errors import CkksContextError, SealedBoxError
from aipipe.secure.identity import Identity
from aipipe.secure.sealedbox import x25519_public_bytes


@pytest.fixture(scope="module")
def secret() -> CkksContext:
    return CkksContext.generate()


@pytest.fixture(scope="module")
def public(secret: CkksContext) -> CkksContext:
    return CkksContext.from_bytes(secret.public_bytes())


@settings(max_examples=6, deadline=None)
@given(
    count=st.integers(4, 10),
    length=st.integers(1_000, 10_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_decrypting_the_hubs_sum_gives_the_sum_within_1e_4(
    secret: CkksContext, public: CkksContext, count: int, length: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1.0, 1.0, length) for _ in range(count)]
    wire = [EncryptedVector.from_bytes(secret.encrypt(x).to_bytes()) for x in xs]
    total = secret.decrypt(sum_encrypted(public, wire))
    exact = np.sum(xs, axis=0)
    assert np.linalg.norm(total - exact) <= 1e-4 * np.linalg.norm(exact)
    assert np.max(np.abs(total - exact)) <= secret.params.error_bound(count)


def test_pairwise_add_with_the_public_context_equals_the_streaming_sum(
    secret: CkksContext, public: CkksContext
) -> None:
    a, b = np.linspace(-1, 1, 5000), np.linspace(1, -1, 5000) ** 3
    pair = public.add(secret.encrypt(a), secret.encrypt(b))
    np.testing.assert_allclose(secret.decrypt(pair), a + b, atol=1e-7)


def test_the_public_context_holds_no_secret_key_and_tenseal_refuses_to_decrypt(
    secret: CkksContext, public: CkksContext
) -> None:
    assert not public.is_private and not public.tenseal.is_private()
    # Straight to TenSEAL, past aipipe's own check: the library itself cannot decrypt.
    chunk = secret.encrypt(np.ones(10)).chunks[0]
    vector = ts.ckks_vector_from(public.tenseal, chunk)
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        vector.decrypt()
    with pytest.raises(CkksContextError, match="public CKKS context cannot decrypt"):
        public.decrypt(secret.encrypt(np.ones(10)))
    with pytest.raises(CkksContextError, match="cannot encrypt"):
        public.encrypt(np.ones(10))


def test_public_and_secret_forms_share_one_fingerprint(secret: CkksContext) -> None:
    reloaded = CkksContext.from_bytes(secret.secret_bytes())
    assert reloaded.is_private
    assert (
        reloaded.fingerprint
        == secret.fingerprint
        == CkksContext.from_bytes(secret.public_bytes()).fingerprint
    )


def test_a_ciphertext_from_another_context_is_refused(
    secret: CkksContext, public: CkksContext
) -> None:
    foreign = CkksContext.generate()  # same parameters: TenSEAL alone would add them
    mine, theirs = secret.encrypt(np.ones(100)), foreign.encrypt(np.ones(100))
    with pytest.raises(CkksContextError, match="refusing to mix contexts"):
        public.add(mine, theirs)
    total = CkksSum(public)
    total.add(mine)
    with pytest.raises(CkksContextError, match="refusing to mix contexts"):
        total.add(theirs)


def test_tenseal_refuses_a_ciphertext_of_other_parameters(public: CkksContext) -> None:
    other = CkksContext.generate(CkksParams(8192, (60, 40, 60), 40))
    smuggled = dataclasses.replace(other.encrypt(np.ones(100)), fingerprint=public.fingerprint)
    with pytest.raises(CkksContextError, match="TenSEAL refuses"):
        public.add(smuggled, smuggled)


def test_parameters_above_the_he_standard_bound_are_refused() -> None:
    assert HE_STANDARD_MAX_LOG_Q_128[8192] == 218
    with pytest.raises(CkksContextError, match="below 128-bit security"):
        CkksParams(8192, (60, 60, 60, 60), 40)  # 240 > 218
    with pytest.raises(CkksContextError, match="below 128-bit security"):
        CkksParams(4096, (60, 60), 40)  # 120 > 109


def test_parameters_are_chosen_from_range_and_precision() -> None:
    small = choose_ckks_params(max_abs_sum=100.0, precision=1e-6, n_max=50)
    assert (small.poly_modulus_degree, small.coeff_mod_bit_sizes) == (4096, (60, 49))
    context = CkksContext.generate(small)
    x = np.linspace(-2, 2, 3000)  # two ciphertexts of 2048 slots
    total = sum_encrypted(context, [context.encrypt(x) for _ in range(50)])
    assert np.max(np.abs(context.decrypt(total) - 50 * x)) <= 1e-6
    wide = choose_ckks_params(max_abs_sum=1e9, precision=1e-6, n_max=50)
    assert wide.coeff_mod_bit_sizes == (60, 40, 60)
    assert wide.log2_max_abs >= 30 and wide.error_bound(50) <= 1e-6
    # The wider modulus really carries sums of that size at that precision.
    context = CkksContext.generate(wide)
    x = np.linspace(-2e7, 2e7, 100)
    total = sum_encrypted(context, [context.encrypt(x) for _ in range(50)])
    assert np.max(np.abs(context.decrypt(total) - 50 * x)) <= 1e-6


def test_a_sealed_context_opens_for_its_recipient_only(secret: CkksContext) -> None:
    sender, node, other = (
        Identity.generate(),
        X25519PrivateKey.generate(),
        X25519PrivateKey.generate(),
    )
    sealed = seal_context(
        secret,
        study_id="chd",
        recipient_id="h2",
        recipient_public_key=x25519_public_bytes(node),
        sender=sender,
    )
    opened = open_context(
        sealed,
        study_id="chd",
        recipient_id="h2",
        recipient_key=node,
        sender_public_key=sender.public_bytes,
    )
    assert opened.is_private and opened.fingerprint == secret.fingerprint
    np.testing.assert_allclose(opened.decrypt(secret.encrypt(np.ones(3))), np.ones(3), atol=1e-7)
    with pytest.raises(SealedBoxError, match="does not open"):
        open_context(
            sealed,
            study_id="chd",
            recipient_id="h2",
            recipient_key=other,
            sender_public_key=sender.public_bytes,
        )
    with pytest.raises(SealedBoxError, match="not for 'h3'"):
        open_context(
            sealed,
            study_id="chd",
            recipient_id="h3",
            recipient_key=node,
            sender_public_key=sender.public_bytes,
        )


def test_a_sealed_context_relabelled_for_another_study_does_not_open(secret: CkksContext) -> None:
    sender, node = Identity.generate(), X25519PrivateKey.generate()
    sealed = seal_context(
        secret,
        study_id="chd",
        recipient_id="h2",
        recipient_public_key=x25519_public_bytes(node),
        sender=sender,
    )
    moved = dataclasses.replace(sealed, study_id="other")
    with pytest.raises(SealedBoxError, match="not signed by the expected node"):
        open_context(
            moved,
            study_id="other",
            recipient_id="h2",
            recipient_key=node,
            sender_public_key=sender.public_bytes,
        )
    # Re-signed by the sender itself, the label passes but the box's associated data does not.
    resigned = dataclasses.replace(moved, signature=sender.sign(moved.signing_bytes()))
    with pytest.raises(SealedBoxError, match="does not open"):
        open_context(
            resigned,
            study_id="other",
            recipient_id="h2",
            recipient_key=node,
            sender_public_key=sender.public_bytes,
        )
