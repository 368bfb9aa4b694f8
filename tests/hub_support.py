"""The hub in-process for tests: FastAPI's TestClient over a hub home made by `init_hub`.

The client runs the app's lifespan (store, audit log, deadline ticker). Nodes are built here
with real Ed25519 identities and X25519 sealing keys and enrol with tokens from
`aipipe.hub.enrolment.issue_token`, as `aipipe.node.home.enrol` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyotp
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi.testclient import TestClient
from httpx import Response

from aipipe.audit.events import AuditEvent
from aipipe.audit.log import AuditLog
from aipipe.hub.app import create_app
from aipipe.hub.enrolment import issue_token
from aipipe.hub.home import HubPaths, init_hub
from aipipe.secure.encoding import UpdateLayout
from aipipe.secure.identity import Identity
from aipipe.secure.sealedbox import x25519_public_bytes
from aipipe.study.spec import StudySpec
from aipipe.wire import EnrolRequest, EnrolToken, RoundWork
from aipipe.wire.frames import MEDIA_TYPE
from aipipe.wire.secure import sealing_key_payload
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import frame, signed_update

Arrays = dict[str, npt.NDArray[Any]]

STUDY: dict[str, Any] = {
    "name": "hub-test",
    "cohort": {"label": {"conditions": ["snomed|53741008"]}},
    "features": [
        {"name": "age", "codes": ["loinc|30525-0"]},
        {"name": "chol", "codes": ["loinc|2093-3"]},
    ],
    "min_nodes": 2,
}


@dataclass(frozen=True)
class Node:
    name: str
    identity: Identity
    credential: str
    sealing: X25519PrivateKey

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}


@dataclass(frozen=True)
class Round:
    study: str
    digest: str
    number: int
    base_version: str
    base: Arrays
    spec: StudySpec

    @property
    def layout(self) -> UpdateLayout:
        return UpdateLayout.of(self.base)

    @property
    def path(self) -> str:
        return f"/v1/studies/{self.study}/rounds/{self.number}"

    def train_item(self) -> RoundWork:
        """The work item a node gets to train for this round."""
        return RoundWork(
            kind="train",
            study=self.study,
            study_digest=self.digest,
            round=self.number,
            version=self.base_version,
        )


def enrol_request(
    token: EnrolToken, identity: Identity, sealing: X25519PrivateKey | None
) -> EnrolRequest:
    """What `aipipe.node.home.enrol` sends: the identity key and the signed sealing key."""
    if sealing is None:
        return EnrolRequest(node=token.node, secret=token.secret, public_key=identity.public_hex)
    public = x25519_public_bytes(sealing)
    return EnrolRequest(
        node=token.node,
        secret=token.secret,
        public_key=identity.public_hex,
        sealing_key=public.hex(),
        sealing_signature=identity.sign(sealing_key_payload(token.node, public)).hex(),
    )


@dataclass
class Hub:
    client: TestClient
    paths: HubPaths
    admin_token: str

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def issue_token(self, node: str) -> EnrolToken:
        """A one-time token, issued the way `aipipe hub enrol-token` issues it."""
        store = self.paths.open_store()
        audit = AuditLog.open(self.paths.audit_log, Identity.load(self.paths.identity_key))
        try:
            return EnrolToken.decode(issue_token(store, audit, node, "http://testserver"))
        finally:
            audit.close()
            store.close()

    def enrol_request(
        self, token: EnrolToken, identity: Identity, sealing: X25519PrivateKey | None = None
    ) -> Response:
        body = enrol_request(token, identity, sealing)
        response: Response = self.client.post("/v1/enrol", json=body.model_dump())
        return response

    def enrol(self, name: str) -> Node:
        identity, sealing = Identity.generate(), X25519PrivateKey.generate()
        response = self.enrol_request(self.issue_token(name), identity, sealing)
        assert response.status_code == 200, response.text
        return Node(name, identity, response.json()["credential"], sealing)

    def publish(self, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.client.post("/v1/studies", json={"spec": spec or STUDY}, headers=self.admin)
        assert response.status_code == 200, response.text
        study: dict[str, Any] = response.json()
        return study

    def post_round(self, study: str = "hub-test", deadline_s: float | None = None) -> Response:
        response: Response = self.client.post(
            f"/v1/studies/{study}/rounds", json={"deadline_s": deadline_s}, headers=self.admin
        )
        return response

    def open_round(self, study: dict[str, Any], deadline_s: float | None = None) -> Round:
        response = self.post_round(study["name"], deadline_s)
        assert response.status_code == 200, response.text
        info = response.json()
        spec = StudySpec.model_validate(study["spec"])
        base = self.weights(info["base_version"])
        return Round(
            study["name"], study["digest"], info["round"], info["base_version"], base, spec
        )

    def round(self, at: Round) -> dict[str, Any]:
        info: dict[str, Any] = self.client.get(at.path, headers=self.admin).json()
        return info

    def weights(self, version: str) -> Arrays:
        response = self.client.get(f"/v1/models/{version}/weights", headers=self.admin)
        assert response.status_code == 200, response.text
        return decode_arrays(response.content)

    def models(self, study: str) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = self.client.get(
            "/v1/models", params={"study": study}, headers=self.admin
        ).json()
        return models

    def events(self, action: str) -> list[AuditEvent]:
        with AuditLog.open(self.paths.audit_log, None) as log:
            return [e for e in log.events() if e.action == action]

    def upload(
        self, node: Node, at: Round, body: bytes, content_type: str = MEDIA_TYPE
    ) -> Response:
        response: Response = self.client.post(
            f"{at.path}/updates",
            content=body,
            headers={**node.headers, "Content-Type": content_type},
        )
        return response


def totp_now(uri: str) -> str:
    """The current code of a person's otpauth:// provisioning URI, as their app shows it."""
    otp = pyotp.parse_uri(uri)
    assert isinstance(otp, pyotp.TOTP)
    return otp.now()


@contextmanager
def running_hub(home: Path) -> Iterator[Hub]:
    """A fresh hub home served in-process (lifespan, store, audit log and ticker included)."""
    paths, token = init_hub(home, "test-hub")
    with TestClient(create_app(paths)) as client:
        yield Hub(client, paths, token)


def update(
    node: Node,
    at: Round,
    delta: Arrays | None = None,
    *,
    n: int = 10,
    signer: Identity | None = None,
    signed: bool = True,
    base_version: str | None = None,
    epsilon: float | None = None,
) -> bytes:
    """A framed update of `node` for round `at` (a small delta of the right shapes by default),
    stating `epsilon` spent in its header if given."""
    header, payload = signed_update(
        signer or node.identity,
        node=node.name,
        study=at.study,
        study_digest=at.digest,
        round=at.number,
        base_version=base_version or at.base_version,
        delta=delta
        if delta is not None
        else {k: np.full_like(v, 0.01) for k, v in at.base.items()},
        num_examples=n,
        signed=signed,
        epsilon=epsilon,
    )
    return frame(header, payload)
