"""CDS Client authentication: JWT checks and the replay cache (aipipe.cds.auth)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from aipipe.cds import JwtPolicy, MemoryJtiStore
from aipipe.errors import AuthError
from tests.cds_support import BASE, ENDPOINT, ISSUER, Signer


@pytest.fixture
def policy(es384: Signer, rs384: Signer) -> JwtPolicy:
    return JwtPolicy({ISSUER: {"keys": [es384.jwk, rs384.jwk]}}, base_url=BASE)


def verify(policy: JwtPolicy, token: str) -> Any:
    return policy.verify(f"Bearer {token}", policy.audience("ignored", ENDPOINT))


@pytest.mark.parametrize("signer", ["es384", "rs384"])
def test_a_token_from_an_allowed_client_is_accepted(
    policy: JwtPolicy, signer: str, request: pytest.FixtureRequest
) -> None:
    client = verify(policy, request.getfixturevalue(signer).token())

    assert (client.issuer, client.tenant, client.actor) == (
        ISSUER,
        "st-olav",
        f"cds-client:{ISSUER}",
    )


def test_aud_may_be_a_list_that_names_the_endpoint(policy: JwtPolicy, es384: Signer) -> None:
    verify(policy, es384.token(aud=[BASE + ENDPOINT]))


def test_the_same_token_twice_is_a_replay(policy: JwtPolicy, es384: Signer) -> None:
    token = es384.token()
    verify(policy, token)

    with pytest.raises(AuthError, match="replayed"):
        verify(policy, token)


def other_key_same_kid() -> Signer:
    return Signer("ES384", kid="k1")


def now() -> int:
    return int(time.time())


BAD: list[tuple[str, Callable[[Signer], str], str]] = [
    ("another endpoint's aud", lambda s: s.token(aud=BASE + "/cds-services/other"), "aud"),
    ("the discovery aud", lambda s: s.token(endpoint=""), "aud"),
    ("expired", lambda s: s.token(exp=now() - 120, iat=now() - 180), "expired"),
    ("issued in the future", lambda s: s.token(iat=now() + 600, exp=now() + 660), "rejected"),
    ("too long-lived", lambda s: s.token(exp=now() + 3600), "expires more than"),
    ("an unknown iss", lambda s: s.token(iss="https://evil.example/"), "not an allowed"),
    ("no jti", lambda s: s.token(jti=None), "jti"),
    ("no exp", lambda s: s.token(exp=None), "exp"),
    ("an unknown kid", lambda s: s.token(headers={"kid": "k9"}), "no key with kid 'k9'"),
    ("no typ", lambda s: s.token(headers={"typ": None}), "typ"),
    ("a key of another client", lambda s: other_key_same_kid().token(), "rejected"),
    (
        "HMAC",
        lambda s: jwt.encode(
            {"iss": ISSUER}, "secret" * 6, algorithm="HS256", headers={"kid": "k1"}
        ),
        "HS256",
    ),
    ("alg none", lambda s: jwt.encode({"iss": ISSUER}, "", algorithm="none"), "'none'"),
    ("an RSA kid under ES384", lambda s: s.token(headers={"kid": "k2"}), "cannot verify"),
    ("not a JWT", lambda s: "not-a-jwt", "not a JWT"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_token_is_refused_with_the_reason(
    policy: JwtPolicy, es384: Signer, make: Callable[[Signer], str], message: str
) -> None:
    with pytest.raises(AuthError, match=message):
        verify(policy, make(es384))


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer  "])
def test_a_missing_or_malformed_authorization_header_is_refused(
    policy: JwtPolicy, header: str | None
) -> None:
    with pytest.raises(AuthError, match="Bearer"):
        policy.verify(header, BASE + ENDPOINT)


def test_jku_never_chooses_the_key(policy: JwtPolicy) -> None:
    intruder = other_key_same_kid()

    with pytest.raises(AuthError, match="rejected"):
        verify(policy, intruder.token(headers={"jku": "https://evil.example/jwks"}))


def test_without_a_base_url_the_audience_is_the_request_url(es384: Signer) -> None:
    policy = JwtPolicy({ISSUER: {"keys": [es384.jwk]}})

    assert (
        policy.audience("http://h/cds-services/x?y=1", "/cds-services/x")
        == "http://h/cds-services/x"
    )


@pytest.mark.parametrize(
    ("issuers", "algorithms", "message"),
    [
        ({ISSUER: {"keys": []}}, ("ES384",), "no keys"),
        ({}, ("ES384",), "at least one"),
        ({ISSUER: {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}}, ("HS256",), "HMAC"),
        ({ISSUER: {"keys": [{"kty": "EC"}]}}, ("ES384",), "kid"),
    ],
)
def test_an_unsafe_or_incomplete_policy_is_refused(
    issuers: dict[str, Any], algorithms: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        JwtPolicy(issuers, algorithms=algorithms)


def test_a_policy_refuses_a_private_key(es384: Signer) -> None:
    private = jwt.algorithms.ECAlgorithm.to_jwk(es384.key, as_dict=True) | {"kid": "k1"}

    with pytest.raises(ValueError, match="private key"):
        JwtPolicy({ISSUER: {"keys": [private]}})


def test_the_replay_cache_forgets_a_jti_once_its_token_expired() -> None:
    clock = [1000.0]
    store = MemoryJtiStore(clock=lambda: clock[0])

    assert store.claim("iss", "a", expires_at=1060.0)
    assert not store.claim("iss", "a", expires_at=1060.0)
    clock[0] = 1061.0
    assert store.claim("iss", "b", expires_at=1120.0)
    assert len(store) == 1


def test_the_replay_cache_keys_on_issuer_and_jti() -> None:
    store = MemoryJtiStore()

    assert store.claim("iss-1", "a", expires_at=time.time() + 60)
    assert store.claim("iss-2", "a", expires_at=time.time() + 60)
