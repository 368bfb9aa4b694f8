"""SMART Backend Services auth against a scripted EHR (httpx.MockTransport) and a fake clock."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from aipipe.errors import ConfigError, FhirServerError, IdentityError
from aipipe.fhir.server import FhirServerSource
from aipipe.fhir.smart import (
    ASSERTION_TYPE,
    DEFAULT_SCOPES,
    SmartAuthError,
    SmartBackendAuth,
    SmartKey,
    jwk_thumbprint,
    smart_auth_for,
)

BASE = "https://ehr.example.org/fhir"
TOKEN_URL = "https://ehr.example.org/auth/token"
DISCOVERY = "/fhir/.well-known/smart-configuration"
CLIENT_ID = "aipipe-node-7"


class FakeClock:
    def __init__(self) -> None:
        self.now = float(int(time.time())) + 0.7  # real time, so PyJWT's own exp check applies

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeEhr:
    """A SMART authorization server and FHIR server in one, recording what it was sent."""

    expires_in: Any = 300
    config: dict[str, Any] | None = field(
        default_factory=lambda: {
            "token_endpoint": TOKEN_URL,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": ["client_credentials"],
        }
    )
    token_error: tuple[int, dict[str, Any]] | None = None
    reject_all_tokens: bool = False
    discoveries: int = 0
    token_forms: list[dict[str, str]] = field(default_factory=list)
    fhir_auth_headers: list[str] = field(default_factory=list)
    rejected: set[str] = field(default_factory=set)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == DISCOVERY:
            self.discoveries += 1
            if self.config is None:
                return httpx.Response(404, text="not found")
            return httpx.Response(200, json=self.config)
        if str(request.url) == TOKEN_URL:
            return self.token(request)
        return self.fhir(request)

    def token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.token_forms.append(form)
        if self.token_error is not None:
            status, body = self.token_error
            return httpx.Response(status, json=body)
        body = {
            "access_token": f"token-{len(self.token_forms)}",
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": form.get("scope", ""),
        }
        return httpx.Response(200, json=body)

    def fhir(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization", "")
        self.fhir_auth_headers.append(header)
        token = header.removeprefix("Bearer ")
        if not token.startswith("token-") or self.reject_all_tokens or token in self.rejected:
            return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        return httpx.Response(200, json=bundle)

    def assertions(self) -> list[str]:
        return [form["client_assertion"] for form in self.token_forms]


@pytest.fixture(scope="module")
def es_key() -> SmartKey:
    return SmartKey.generate("ES384")


@pytest.fixture(scope="module")
def rs_key() -> SmartKey:
    return SmartKey.generate("RS384")


def make_auth(ehr: FakeEhr, key: SmartKey, clock: FakeClock, **kwargs: Any) -> SmartBackendAuth:
    return SmartBackendAuth(
        base_url=BASE,
        client_id=CLIENT_ID,
        key=key,
        transport=ehr.transport(),
        clock=clock,
        **kwargs,
    )


def pull(ehr: FakeEhr, auth: SmartBackendAuth, times: int = 1) -> None:
    with FhirServerSource(
        base_url=BASE, auth=auth, transport=ehr.transport(), max_retries=0
    ) as source:
        for _ in range(times):
            list(source.iter_resources("Patient"))


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_assertion_is_signed_with_the_node_key_and_carries_the_spec_claims(
    alg: str, es_key: SmartKey, rs_key: SmartKey
) -> None:
    key = es_key if alg == "ES384" else rs_key
    ehr, clock = FakeEhr(), FakeClock()

    pull(ehr, make_auth(ehr, key, clock))

    (assertion,) = ehr.assertions()
    header = jwt.get_unverified_header(assertion)
    claims = jwt.decode(assertion, key.key.public_key(), algorithms=[alg], audience=TOKEN_URL)
    assert header == {"alg": alg, "kid": key.kid, "typ": "JWT"}
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == TOKEN_URL
    assert 0 < claims["exp"] - clock.now <= 300
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 32


def test_token_request_is_a_client_credentials_grant_with_a_jwt_bearer_assertion(
    es_key: SmartKey,
) -> None:
    ehr = FakeEhr()

    pull(ehr, make_auth(ehr, es_key, FakeClock()))

    (form,) = ehr.token_forms
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert form["scope"] == DEFAULT_SCOPES
    assert ehr.fhir_auth_headers == ["Bearer token-1"]


def test_token_is_cached_and_discovery_runs_once(es_key: SmartKey) -> None:
    ehr = FakeEhr()
    auth = make_auth(ehr, es_key, FakeClock())

    pull(ehr, auth, times=3)

    assert (ehr.discoveries, len(ehr.token_forms), auth.tokens_fetched) == (1, 1, 1)
    assert ehr.fhir_auth_headers == ["Bearer token-1"] * 3


def test_token_is_renewed_a_minute_before_it_expires(es_key: SmartKey) -> None:
    ehr, clock = FakeEhr(expires_in=300), FakeClock()
    auth = make_auth(ehr, es_key, clock)
    pull(ehr, auth)

    clock.now += 239
    pull(ehr, auth)
    clock.now += 2
    pull(ehr, auth)

    assert ehr.fhir_auth_headers == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


def test_short_lived_tokens_are_renewed_at_half_their_lifetime(es_key: SmartKey) -> None:
    ehr, clock = FakeEhr(expires_in=10), FakeClock()
    auth = make_auth(ehr, es_key, clock)
    pull(ehr, auth)

    clock.now += 4.9
    pull(ehr, auth)
    clock.now += 0.2
    pull(ehr, auth)

    assert ehr.fhir_auth_headers == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


def test_every_assertion_has_its_own_jti(es_key: SmartKey) -> None:
    ehr, clock = FakeEhr(expires_in=300), FakeClock()
    auth = make_auth(ehr, es_key, clock)

    for _ in range(3):
        pull(ehr, auth)
        clock.now += 300

    jtis = [jwt.decode(a, options={"verify_signature": False})["jti"] for a in ehr.assertions()]
    assert len(jtis) == len(set(jtis)) == 3


def test_a_401_is_retried_once_with_a_fresh_token(es_key: SmartKey) -> None:
    ehr = FakeEhr()
    ehr.rejected.add("token-1")  # revoked by the EHR before its expires_in ran out

    pull(ehr, make_auth(ehr, es_key, FakeClock()))

    assert ehr.fhir_auth_headers == ["Bearer token-1", "Bearer token-2"]


def test_a_second_401_is_not_retried_and_surfaces_as_a_fhir_server_error(
    es_key: SmartKey,
) -> None:
    ehr = FakeEhr(reject_all_tokens=True)

    with pytest.raises(FhirServerError, match="answered 401"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))

    assert len(ehr.fhir_auth_headers) == 2
    assert len(ehr.token_forms) == 2


def test_invalid_client_names_the_kid_and_client_id_to_register(es_key: SmartKey) -> None:
    ehr = FakeEhr(token_error=(401, {"error": "invalid_client", "error_description": "bad sig"}))

    with pytest.raises(SmartAuthError) as caught:
        pull(ehr, make_auth(ehr, es_key, FakeClock()))

    message = str(caught.value)
    assert "rejected this node's client assertion" in message
    assert es_key.kid in message and repr(CLIENT_ID) in message and "bad sig" in message


def test_error_messages_never_carry_the_assertion(es_key: SmartKey) -> None:
    ehr = FakeEhr()
    ehr.token_error = (400, {"error": "invalid_request", "error_description": "echo"})
    ehr.handle = _echoing_assertion(ehr)  # type: ignore[method-assign]

    with pytest.raises(SmartAuthError) as caught:
        pull(ehr, make_auth(ehr, es_key, FakeClock()))

    (assertion,) = ehr.assertions()
    assert assertion not in str(caught.value)
    assert assertion.split(".")[1] not in str(caught.value)
    assert "[jwt]" in str(caught.value)


def _echoing_assertion(ehr: FakeEhr) -> Any:
    original = ehr.handle

    def handle(request: httpx.Request) -> httpx.Response:
        if str(request.url) != TOKEN_URL:
            return original(request)
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        ehr.token_forms.append(form)
        body = {"error": "invalid_request", "error_description": f"bad {form['client_assertion']}"}
        return httpx.Response(400, json=body)

    return handle


def test_invalid_scope_says_which_scopes_were_asked_for(es_key: SmartKey) -> None:
    ehr = FakeEhr(token_error=(400, {"error": "invalid_scope"}))

    with pytest.raises(SmartAuthError, match=r"granted none of the scopes.*system/Patient\.rs"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))


def test_missing_smart_configuration_points_at_the_discovery_url(es_key: SmartKey) -> None:
    ehr = FakeEhr(config=None)

    with pytest.raises(SmartAuthError, match=r"no SMART configuration at .*smart-configuration"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))


def test_configuration_without_token_endpoint_is_refused(es_key: SmartKey) -> None:
    ehr = FakeEhr(config={"capabilities": ["client-confidential-asymmetric"]})

    with pytest.raises(SmartAuthError, match="names no token_endpoint"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))


def test_server_that_does_not_list_our_algorithm_is_refused_before_signing(
    es_key: SmartKey,
) -> None:
    ehr = FakeEhr()
    assert ehr.config is not None
    ehr.config["token_endpoint_auth_signing_alg_values_supported"] = ["RS384"]

    with pytest.raises(SmartAuthError, match="without 'ES384'"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))
    assert ehr.token_forms == []


def test_plain_http_token_endpoint_is_refused_for_an_https_fhir_server(es_key: SmartKey) -> None:
    ehr = FakeEhr()
    assert ehr.config is not None
    ehr.config["token_endpoint"] = "http://ehr.example.org/auth/token"

    with pytest.raises(SmartAuthError, match="without TLS"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))


def test_unreachable_token_endpoint_is_reported(es_key: SmartKey) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    auth = SmartBackendAuth(
        base_url=BASE,
        client_id=CLIENT_ID,
        key=es_key,
        token_url=TOKEN_URL,
        transport=httpx.MockTransport(refuse),
    )

    with pytest.raises(SmartAuthError, match=r"cannot reach the EHR's token endpoint"):
        pull(FakeEhr(), auth)


def test_expires_in_that_is_not_a_positive_number_is_refused(es_key: SmartKey) -> None:
    ehr = FakeEhr(expires_in="soon")

    with pytest.raises(SmartAuthError, match="expires_in='soon'"):
        pull(ehr, make_auth(ehr, es_key, FakeClock()))


def test_token_is_never_sent_to_another_server(es_key: SmartKey) -> None:
    ehr = FakeEhr()
    auth = make_auth(ehr, es_key, FakeClock())

    with (
        httpx.Client(auth=auth, transport=ehr.transport()) as client,
        pytest.raises(SmartAuthError, match="another server"),
    ):
        client.get("https://elsewhere.example.com/fhir/Patient")
    assert ehr.token_forms == []


def test_async_client_is_refused_rather_than_sent_without_a_token(es_key: SmartKey) -> None:
    ehr = FakeEhr()
    auth = make_auth(ehr, es_key, FakeClock())

    async def get() -> None:
        async with httpx.AsyncClient(auth=auth, transport=ehr.transport()) as client:
            await client.get(f"{BASE}/Patient")

    with pytest.raises(TypeError, match="synchronous"):
        asyncio.run(get())
    assert ehr.fhir_auth_headers == []


def test_scopes_with_out_of_order_permissions_are_refused(es_key: SmartKey) -> None:
    with pytest.raises(ConfigError, match="in-order subset of 'cruds'"):
        SmartBackendAuth(base_url=BASE, client_id=CLIENT_ID, key=es_key, scopes="system/Patient.sr")


def test_key_file_is_written_owner_only_and_loads_back(tmp_path: Path, es_key: SmartKey) -> None:
    path = tmp_path / "smart.key"

    es_key.save(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SmartKey.load(path).public_jwks() == es_key.public_jwks()


def test_key_readable_by_others_is_refused(tmp_path: Path, es_key: SmartKey) -> None:
    path = tmp_path / "smart.key"
    es_key.save(path)
    path.chmod(0o644)

    with pytest.raises(IdentityError, match="chmod 600"):
        SmartKey.load(path)


def test_existing_key_file_is_never_overwritten(tmp_path: Path, es_key: SmartKey) -> None:
    path = tmp_path / "smart.key"
    es_key.save(path)
    before = path.read_bytes()

    with pytest.raises(IdentityError, match="already exists"):
        SmartKey.generate().save(path)
    assert path.read_bytes() == before


def test_smart_auth_for_loads_the_key_file(tmp_path: Path, es_key: SmartKey) -> None:
    path = tmp_path / "smart.key"
    es_key.save(path)

    auth = smart_auth_for(BASE, CLIENT_ID, path)

    assert (auth.client_id, auth.key.kid, auth.base_url) == (CLIENT_ID, es_key.kid, BASE)


def test_thumbprint_matches_rfc_7638_example() -> None:
    # RFC 7638 §3.1: the RSA key of RFC 7517 appendix A.1 and its published thumbprint.
    jwk = {
        "kty": "RSA",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
            "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4"
            "QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbO"
            "pbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
            "Cur-kEgU8awapJzKnqDKgw"
        ),
    }

    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_public_jwk_matches_pyjwt_and_its_kid_is_its_thumbprint(
    alg: str, es_key: SmartKey, rs_key: SmartKey
) -> None:
    key = es_key if alg == "ES384" else rs_key
    public = key.key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        reference = json.loads(ECAlgorithm.to_jwk(public))
    else:
        reference = json.loads(RSAAlgorithm.to_jwk(public))

    (jwk,) = key.public_jwks()["keys"]

    members = ("crv", "x", "y") if alg == "ES384" else ("n", "e")
    assert {m: jwk[m] for m in members} == {m: reference[m] for m in members}
    assert jwk["kid"] == key.kid == jwk_thumbprint(reference)
    assert (jwk["alg"], jwk["use"], jwk["key_ops"]) == (alg, "sig", ["verify"])
    assert "d" not in jwk and "p" not in jwk


def test_kid_is_stable_across_save_and_load(tmp_path: Path) -> None:
    key = SmartKey.generate()
    key.save(tmp_path / "smart.key")

    assert SmartKey.load(tmp_path / "smart.key").kid == key.kid
    assert SmartKey.generate().kid != key.kid
