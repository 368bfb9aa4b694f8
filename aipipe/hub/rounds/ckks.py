"""CKKS rounds at the hub: the key ceremony, the ciphertext sum, and the key holder's decryption.

    keys        the designated node (by name, rotating with the round number) generates the
                study's context and posts the public context plus the secret context sealed to
                every other selected node's X25519 key; once per study
    collecting  nodes post ciphertexts of [r, r·Δ]; the hub folds them with the public context,
                which can add but neither encrypt nor decrypt
    decrypting  one contributor (rotating with the round; the next one if it does not answer
                within the stage timeout) fetches the sum *and* every signed contribution,
                rebuilds the sum, checks it is the hub's and has ≥ min_nodes distinct signers,
                and only then decrypts and posts the sum

Nodes enrolled after the ceremony hold no key for the study and are not selected for it.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

import numpy as np
from pydantic import ValidationError

from aipipe.errors import ConflictError, NotFoundError, SignatureError
from aipipe.hub.rounds.context import NodeStatus, RoundContext
from aipipe.hub.rounds.secure_sum import SecureProtocol
from aipipe.secure.ckks import CkksContext, CkksSum, EncryptedVector
from aipipe.secure.encoding import FloatArray
from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.identity import verify_signature
from aipipe.store.hub_rounds import RoundRow
from aipipe.store.secure_store import CkksKeysRow
from aipipe.study.spec import StudySpec
from aipipe.wire import (
    FrameError,
    RoundState,
    RoundWork,
    SecureMode,
    UpdateHeader,
    pack_frame,
    unpack_frame,
)
from aipipe.wire.secure import (
    CkksKeyInfo,
    CkksKeys,
    DecryptBundleHeader,
    DecryptedSum,
    SealedContextWire,
    ckks_keys_payload,
)
from aipipe.wire.tensors import TensorDecodeError, decode_arrays


class CkksStage(StrEnum):
    KEYS = "keys"
    COLLECTING = "collecting"
    DECRYPTING = "decrypting"


class CkksRound(SecureProtocol):
    mode = SecureMode.CKKS

    def __init__(self, ctx: RoundContext) -> None:
        super().__init__(ctx)
        self._decrypted: dict[tuple[str, int], tuple[FloatArray, list[str]]] = {}

    def eligible(self, spec: StudySpec, nodes: list[str]) -> list[str]:
        """Key holders once the study has keys; before, nodes that can receive a sealed box."""
        if self.ctx.secure.ckks_keys(spec.name) is not None:
            holders = self.ctx.secure.ckks_holders(spec.name)
            return [n for n in nodes if n in holders]
        sealable = self.ctx.secure.sealing_keys()
        return [n for n in nodes if n in sealable]

    def open(self, spec: StudySpec, number: int) -> None:
        has_keys = self.ctx.secure.ckks_keys(spec.name) is not None
        self._enter(spec, number, CkksStage.COLLECTING if has_keys else CkksStage.KEYS)

    def _enter(
        self, spec: StudySpec, number: int, stage: CkksStage, holder: str | None = None
    ) -> None:
        deadline = self.stage_deadline(spec, number)
        if stage == CkksStage.COLLECTING:
            row = self.ctx.round_row(spec.name, number)
            deadline = self.ctx.clock.parse(row.deadline)
        iso = self.ctx.clock.iso(deadline)
        self.ctx.secure.set_stage(spec.name, number, stage, iso, holder)

    def designated(self, study: str, number: int) -> str:
        """The node asked to make the keys: rotates with the round number, so a study whose
        designated node is down gets another one at its next round."""
        selected = self.selected(study, number)
        return selected[(number - 1) % len(selected)]

    def work(self, spec: StudySpec, row: RoundRow, node: str, digest: str) -> RoundWork | None:
        stage = self.stage(spec.name, row.round)
        status = self.ctx.store.node_status(spec.name, row.round, node)
        if stage == CkksStage.KEYS and node == self.designated(spec.name, row.round):
            return self.work_item("keygen", spec, row, digest)
        if stage == CkksStage.COLLECTING and status == NodeStatus.SELECTED:
            return self.work_item("train", spec, row, digest)
        if stage == CkksStage.DECRYPTING and node == self.ctx.secure.holder(spec.name, row.round):
            return self.work_item("decrypt", spec, row, digest)
        return None

    # -- key ceremony --------------------------------------------------------------------------

    def post_keys(self, spec: StudySpec, node: str, body: bytes) -> None:
        study = spec.name
        active = self.ctx.store.active_round(study)
        if active is None or self.stage(study, active.round) != CkksStage.KEYS:
            raise ConflictError(f"study '{study}' is not waiting for CKKS keys")
        number = active.round
        if node != self.designated(study, number):
            self.ctx.refuse(node, study, number, "only the designated node makes the keys")
        try:
            keys = CkksKeys.model_validate_json(body)
            public = CkksContext.from_bytes(keys.public_context)
        except (ValidationError, SecureAggregationError) as exc:
            self.ctx.refuse(node, study, number, f"unusable CKKS keys: {exc}")
        problem = self._keys_problem(spec, number, node, keys, public)
        if problem:
            self.ctx.refuse(node, study, number, problem)
        row = CkksKeysRow(node, keys.fingerprint, keys.public_context, keys.signature)
        sealed = {box.recipient_id: box.model_dump_json() for box in keys.sealed}
        self.ctx.secure.set_ckks_keys(study, row, sealed)
        self.audit_stage(study, number, CkksStage.KEYS, len(sealed) + 1, [])
        self._enter(spec, number, CkksStage.COLLECTING)

    def _keys_problem(
        self, spec: StudySpec, number: int, node: str, keys: CkksKeys, public: CkksContext
    ) -> str | None:
        if public.is_private:
            return "the 'public' context carries a secret key; the hub must never hold one"
        if public.fingerprint != keys.fingerprint or keys.generator != node:
            return "the keys' fingerprint or generator does not match"
        try:
            identity = self._identity_key(node)
            payload = ckks_keys_payload(spec.name, keys.fingerprint, keys.public_context)
            verify_signature(identity, keys.signature, payload)
        except SignatureError:
            return "the public context is not signed by the generating node"
        others = set(self.selected(spec.name, number)) - {node}
        recipients = [box.recipient_id for box in keys.sealed]
        if sorted(recipients) != sorted(others):
            return (
                f"sealed contexts go to {sorted(recipients)}, not to the round's {sorted(others)}"
            )
        if any(b.study_id != spec.name or b.fingerprint != keys.fingerprint for b in keys.sealed):
            return "a sealed context is bound to another study or context"
        return None

    def key_info(self, study: str, node: str) -> CkksKeyInfo:
        keys = self.ctx.secure.ckks_keys(study)
        if keys is None:
            raise NotFoundError(f"study '{study}' has no CKKS keys yet")
        sealed = self.ctx.secure.ckks_sealed(study, node)
        return CkksKeyInfo(
            generator=keys.generator,
            fingerprint=keys.fingerprint,
            public_context=keys.public_context,
            signature=keys.signature,
            sealed=None if sealed is None else SealedContextWire.model_validate_json(sealed),
        )

    def public_context(self, study: str) -> CkksContext:
        keys = self.ctx.secure.ckks_keys(study)
        if keys is None:
            raise ConflictError(f"study '{study}' has no CKKS keys yet")
        return CkksContext.from_bytes(keys.public_context)

    # -- ciphertexts ---------------------------------------------------------------------------

    def take(self, spec: StudySpec, header: UpdateHeader, payload: bytes) -> None:
        study, number, node = spec.name, header.round, header.node
        if self.stage(study, number) != CkksStage.COLLECTING:
            self.ctx.refuse(node, study, number, "the round is not collecting ciphertexts")
        context = self.public_context(study)
        size = self.layout(spec, self.ctx.round_row(study, number).base_version).size
        try:
            vector = EncryptedVector.from_bytes(payload)
        except SecureAggregationError as exc:
            self.ctx.refuse(node, study, number, str(exc), "malformed")
        if vector.length != size:
            why = f"ciphertext holds {vector.length} values; this model takes {size}"
            self.ctx.refuse(node, study, number, why, "malformed")

        def fold(previous: bytes | None) -> bytes:
            """Inside the accepting transaction: a ciphertext of another context raises here,
            before its blob or header is kept, and the whole update rolls back."""
            total = CkksSum(context)
            if previous is not None:
                total.add(EncryptedVector.from_bytes(previous))
            total.add(vector)
            self.ctx.store.put_blob(payload)  # addressed by sha256 = payload_sha256
            self.ctx.secure.add_update_header(study, number, node, header.model_dump_json())
            return total.result().to_bytes()

        self.record(header, fold)
        self.advance(spec, number)

    def advance(self, spec: StudySpec, number: int) -> None:
        study = spec.name
        if self.ctx.state(study, number) in (None, RoundState.CLOSED, RoundState.FAILED):
            return
        stage = self.stage(study, number)
        expired = self.stage_expired(study, number)
        if stage == CkksStage.KEYS and expired:
            who = self.designated(study, number)
            self.fail(study, number, f"node '{who}' did not make the CKKS keys in time")
        elif stage == CkksStage.COLLECTING:
            statuses = list(self.ctx.statuses(study, number).values())
            pending = statuses.count(NodeStatus.SELECTED)
            reported = statuses.count(NodeStatus.REPORTED)
            if pending and not expired:
                return
            if reported < spec.min_nodes:
                why = (
                    f"{reported} of {len(statuses)} nodes sent ciphertexts; study '{study}' needs "
                    f"min_nodes={spec.min_nodes}"
                )
                self.fail(study, number, why)
                return
            self.ctx.store.set_round_state(study, number, RoundState.AGGREGATING)
            self.audit_stage(study, number, CkksStage.COLLECTING, reported, [])
            contributors = self._contributors(study, number)
            first = contributors[(number - 1) % len(contributors)]
            self._enter(spec, number, CkksStage.DECRYPTING, first)
        elif stage == CkksStage.DECRYPTING and expired:
            self._next_holder(spec, number)

    def _contributors(self, study: str, number: int) -> list[str]:
        return sorted(self.ctx.secure.update_headers(study, number))

    def _next_holder(self, spec: StudySpec, number: int) -> None:
        """The key holder asked to decrypt did not answer in time: ask the next contributor, and
        fail the round once every contributor had its turn."""
        contributors = self._contributors(spec.name, number)
        late = self.ctx.secure.holder(spec.name, number)
        after = contributors[(contributors.index(late) + 1) % len(contributors)] if late else None
        if after is None or after == contributors[(number - 1) % len(contributors)]:
            self.fail(spec.name, number, "no key-holding node decrypted the sum in time")
            return
        self.audit_stage(spec.name, number, CkksStage.DECRYPTING, len(contributors), [late or ""])
        self._enter(spec, number, CkksStage.DECRYPTING, after)

    def _check_holder(self, study: str, number: int, node: str) -> None:
        if self.stage(study, number) != CkksStage.DECRYPTING:
            raise ConflictError(f"round {number} of '{study}' is not waiting for decryption")
        holder = self.ctx.secure.holder(study, number)
        if node != holder:
            raise ConflictError(
                f"round {number} of '{study}' is decrypted by '{holder}', not '{node}'"
            )

    # -- decryption ----------------------------------------------------------------------------

    def bundle(self, study: str, number: int, node: str) -> bytes:
        """The sum and every signed contribution, for the key holder to check and decrypt."""
        self._check_holder(study, number, node)
        row = self.ctx.round_row(study, number)
        assert row.sum_blob is not None
        headers = self.ctx.secure.update_headers(study, number)
        contributions = [UpdateHeader.model_validate_json(h) for h in headers.values()]
        parts = [row.sum_blob] + [self.ctx.store.blob(h.payload_sha256) for h in contributions]
        head = DecryptBundleHeader(contributions=contributions, sizes=[len(p) for p in parts])
        return pack_frame(head.model_dump_json().encode(), b"".join(parts))

    def decrypted(self, spec: StudySpec, number: int, node: str, body: bytes) -> None:
        study = spec.name
        self._check_holder(study, number, node)
        row = self.ctx.round_row(study, number)
        assert row.sum_blob is not None
        try:
            head_json, payload = unpack_frame(body)
            head = DecryptedSum.model_validate_json(head_json)
            verify_signature(
                self._identity_key(node), bytes.fromhex(head.signature), head.signing_bytes()
            )
            total = decode_arrays(payload)["sum"]
        except (
            FrameError,
            ValidationError,
            SignatureError,
            TensorDecodeError,
            KeyError,
            ValueError,
        ) as exc:
            self.ctx.refuse(node, study, number, f"unusable decrypted sum: {exc}")
        reported = sorted(self.ctx.secure.update_headers(study, number))
        checks = {
            "it names another node, study or round": (head.node, head.study, head.round)
            == (node, study, number),
            "it decrypts another sum": head.sum_sha256 == hashlib.sha256(row.sum_blob).hexdigest(),
            "its contributors differ": sorted(head.contributors) == reported,
            "its payload does not match": head.payload_sha256
            == hashlib.sha256(payload).hexdigest(),
        }
        failed = [why for why, ok in checks.items() if not ok]
        if failed:
            self.ctx.refuse(node, study, number, f"decrypted sum refused: {failed[0]}")
        self._decrypted[(study, number)] = (np.asarray(total, np.float64).ravel(), reported)
        self.conclude(spec, number)

    def decoded_sum(self, spec: StudySpec, number: int) -> tuple[FloatArray, list[str]]:
        found = self._decrypted.pop((spec.name, number), None)
        if found is None:
            raise ConflictError(f"round {number} of '{spec.name}' has no decrypted sum yet")
        return found

    def _identity_key(self, node: str) -> bytes:
        key = self.ctx.store.public_key(node)
        if key is None:
            raise SignatureError(f"node '{node}' is not enrolled")
        return key
