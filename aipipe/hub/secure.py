"""What secure studies need outside a round: enrolment's sealing keys, the keyring nodes fetch,
and the SecAgg+ and CKKS protocols' own HTTP steps (`routes/secure.py` reaches them as
`service.secure.secagg` and `service.secure.ckks`). The rounds themselves run in
`aipipe.hub.rounds`.
"""

from __future__ import annotations

from aipipe.aggregation import aggregator_for
from aipipe.errors import AuthError, SignatureError
from aipipe.hub.rounds.ckks import CkksRound
from aipipe.hub.rounds.registry import Protocols
from aipipe.hub.rounds.secagg import SecAggRound
from aipipe.hub.rounds.secure_sum import check_secure_spec
from aipipe.secure.identity import verify_signature
from aipipe.store.hub_store import HubStore
from aipipe.store.secure_store import SecureStore
from aipipe.study.spec import StudySpec
from aipipe.wire import EnrolRequest
from aipipe.wire.secure import Keyring, KeyringEntry, sealing_key_payload


class SecureRounds:
    def __init__(self, store: HubStore, secure: SecureStore, protocols: Protocols) -> None:
        self._hub_store = store
        self.store = secure
        self.secagg = protocols.of(SecAggRound)
        self.ckks = protocols.of(CkksRound)

    @staticmethod
    def check_spec(spec: StudySpec) -> None:
        """What a secure study's protocol refuses at publish, with the study's own aggregator
        (`SecureProtocol.check_spec` with the hub's context is the same check)."""
        check_secure_spec(spec, aggregator_for(spec.aggregation, spec.training.proximal_mu))

    @staticmethod
    def checked_sealing_key(request: EnrolRequest) -> tuple[bytes, bytes] | None:
        """The (sealing key, signature) a node enrols with, if its identity key signed it."""
        if request.sealing_key is None and request.sealing_signature is None:
            return None
        if request.sealing_key is None or request.sealing_signature is None:
            raise AuthError("a sealing key must come with its identity signature")
        key, signature = (
            bytes.fromhex(request.sealing_key),
            bytes.fromhex(request.sealing_signature),
        )
        try:
            identity = bytes.fromhex(request.public_key)
            verify_signature(identity, signature, sealing_key_payload(request.node, key))
        except SignatureError as exc:
            raise AuthError("the sealing key is not signed by the node's identity key") from exc
        return key, signature

    def keyring(self) -> Keyring:
        sealing = self.store.sealing_keys()
        return Keyring(
            nodes=[
                KeyringEntry(
                    node=row["name"],
                    identity_key=bytes.fromhex(row["public_key"]),
                    sealing_key=sealing.get(row["name"], (None, None))[0],
                    sealing_signature=sealing.get(row["name"], (None, None))[1],
                )
                for row in self._hub_store.nodes()
                if row["state"] == "active"
            ]
        )
