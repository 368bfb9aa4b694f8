"""A node's side of secure rounds: SecAgg+ stages, the CKKS key ceremony, and decryption.

Order keeps the promises of DESIGN §7: the round's ε is charged before anything is sent (the
worker does it); under SecAgg+ the node exchanges keys first and trains only after its shares
are out, so a node that fails while training is a dropout the protocol recovers from; every
message the node sends is bound to the round and signed or authenticated; and a node checks
what the hub announces (round config, unmask requests, CKKS sums) against its own approved
study before it reveals anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from aipipe.errors import SignatureError
from aipipe.node.round_state import SecAggRoundState
from aipipe.node.secagg_node import run_secagg
from aipipe.node.sending import RoundNode, base_layout, recorded_contribution, upload, vault_of
from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.identity import verify_signature
from aipipe.wire import RoundWork, SecureMode, UpdateHeader, pack_frame, unpack_frame
from aipipe.wire.secure import (
    CkksKeys,
    DecryptBundleHeader,
    DecryptedSum,
    Keyring,
    SealedContextWire,
    ckks_keys_payload,
    sealing_key_payload,
)
from aipipe.wire.tensors import encode_arrays

if TYPE_CHECKING:
    from aipipe.models.training import TrainResult
    from aipipe.secure.ckks import CkksContext
    from aipipe.study.spec import StudySpec

CKKS_PRECISION = 1e-7  # absolute error per value of a decrypted sum


# -- SecAgg+ -------------------------------------------------------------------------------------


def secagg_round(
    worker: RoundNode,
    spec: StudySpec,
    item: RoundWork,
    train: Callable[[], TrainResult],
    epsilon: float | None,
    *,
    sigma: float | None = None,
) -> str:
    """Take part in a SecAgg+ round, keeping its state sealed on disk until it ends for this
    node (`aipipe.node.secagg_node`); `sigma` is kept to train again after a restart."""
    state = SecAggRoundState(item=item, epsilon=epsilon, sigma=sigma)
    return run_secagg(worker, spec, state, train)


# -- CKKS ----------------------------------------------------------------------------------------


def _checked_keyring(keyring: Keyring) -> dict[str, tuple[bytes, bytes | None]]:
    """node → (identity key, sealing key if its identity signature verifies)."""
    out: dict[str, tuple[bytes, bytes | None]] = {}
    for entry in keyring.nodes:
        sealing = entry.sealing_key
        if sealing is not None and entry.sealing_signature is not None:
            try:
                verify_signature(
                    entry.identity_key,
                    entry.sealing_signature,
                    sealing_key_payload(entry.node, sealing),
                )
            except SignatureError:
                sealing = None
        out[entry.node] = (entry.identity_key, sealing)
    return out


def ckks_keygen(worker: RoundNode, spec: StudySpec, item: RoundWork) -> str:
    """Make the study's context; seal its secret to every other selected node (via the hub)."""
    from aipipe.secure.ckks import CkksContext, choose_ckks_params, seal_context

    selected = worker.client.round(spec.name, item.round).selected
    keys = _checked_keyring(worker.client.keyring())
    others = [n for n in selected if n != worker.name]
    unsealable = [n for n in others if keys.get(n, (b"", None))[1] is None]
    if unsealable:
        raise SecureAggregationError(f"no verified sealing key for {', '.join(unsealable)}")
    value_max = max(1.0, spec.bounds.update_norm)
    params = choose_ckks_params(
        max_abs_sum=len(selected) * value_max, precision=CKKS_PRECISION, n_max=len(selected)
    )
    context = CkksContext.generate(params)
    sealed = []
    for node in others:
        box = seal_context(
            context,
            study_id=spec.name,
            recipient_id=node,
            recipient_public_key=keys[node][1] or b"",
            sender=worker.identity,
        )
        sealed.append(
            SealedContextWire(
                study_id=box.study_id,
                recipient_id=box.recipient_id,
                fingerprint=box.fingerprint,
                sealed=box.sealed,
                signature=box.signature,
            )
        )
    public = context.public_bytes()
    vault_of(worker).save_context(spec.name, context)
    signature = worker.identity.sign(ckks_keys_payload(spec.name, context.fingerprint, public))
    worker.client.ckks_post_keys(
        spec.name,
        CkksKeys(
            generator=worker.name,
            fingerprint=context.fingerprint,
            public_context=public,
            signature=signature,
            sealed=sealed,
        ),
    )
    worker.audit.append(
        "secure.keygen",
        actor=worker.name,
        resource=f"study/{spec.name}",
        details={
            "recipients": len(sealed),
            "slots": params.slots,
            "coeff_mod_bits": list(params.coeff_mod_bit_sizes),
        },
    )
    return f"made the CKKS context of '{spec.name}' and sealed it to {len(sealed)} nodes"


def study_context(worker: RoundNode, spec: StudySpec) -> CkksContext:
    """The study's secret context: from the vault, or opened from the box sealed to this node."""
    from aipipe.secure.ckks import SealedContext, open_context

    vault = vault_of(worker)
    context = vault.load_context(spec.name)
    if context is not None:
        return context
    info = worker.client.ckks_key_info(spec.name)
    keys = _checked_keyring(worker.client.keyring())
    if info.sealed is None or info.generator not in keys:
        raise SecureAggregationError(f"the hub holds no CKKS context sealed to {worker.name}")
    generator_key = keys[info.generator][0]
    try:
        payload = ckks_keys_payload(spec.name, info.fingerprint, info.public_context)
        verify_signature(generator_key, info.signature, payload)
    except SignatureError as exc:
        raise SecureAggregationError("the study's public context is not the generator's") from exc
    box = info.sealed
    context = open_context(
        SealedContext(box.study_id, box.recipient_id, box.fingerprint, box.sealed, box.signature),
        study_id=spec.name,
        recipient_id=worker.name,
        recipient_key=vault.sealing_key(),
        sender_public_key=generator_key,
    )
    if context.fingerprint != info.fingerprint:
        raise SecureAggregationError("the sealed context is not the study's public one")
    vault.save_context(spec.name, context)
    return context


def ckks_round(
    worker: RoundNode,
    spec: StudySpec,
    item: RoundWork,
    train: Callable[[], TrainResult],
    epsilon: float | None,
) -> str:
    context = study_context(worker, spec)
    layout = base_layout(worker, spec, item)
    x = recorded_contribution(worker, spec, item, train(), layout, epsilon)
    payload = context.encrypt(x).to_bytes()
    receipt = upload(worker, spec, item, payload, epsilon)  # charged before it leaves
    return (
        f"round {item.round}: ckks update sent ({len(payload)} bytes), round {receipt.round_state}"
    )


def ckks_decrypt(worker: RoundNode, spec: StudySpec, item: RoundWork) -> str:
    """Decrypt the round's sum, only if it is the sum of ≥ min_nodes distinct signed updates."""
    from aipipe.secure.ckks import EncryptedVector, sum_encrypted

    context = study_context(worker, spec)
    head_json, payload = unpack_frame(worker.client.ckks_bundle(spec.name, item.round))
    head = DecryptBundleHeader.model_validate_json(head_json)
    parts, offset = [], 0
    for size in head.sizes:
        parts.append(payload[offset : offset + size])
        offset += size
    if offset != len(payload) or len(parts) != len(head.contributions) + 1:
        raise SecureAggregationError("the hub's decryption bundle is malformed")
    roster = {e.node: e.identity_key for e in worker.client.keyring().nodes}
    signers = _checked_contributions(spec, item, head.contributions, parts[1:], roster)
    if len(signers) < spec.min_nodes:
        raise SecureAggregationError(
            f"the hub's sum holds {len(signers)} signed contributions; study '{spec.name}' needs "
            f"min_nodes={spec.min_nodes}, so this node does not decrypt it"
        )
    rebuilt = sum_encrypted(context, [EncryptedVector.from_bytes(c) for c in parts[1:]])
    if rebuilt.to_bytes() != parts[0]:
        raise SecureAggregationError("the hub's sum is not the sum of the signed contributions")
    values = encode_arrays({"sum": context.decrypt(rebuilt)})
    answer = DecryptedSum(
        node=worker.name,
        study=spec.name,
        round=item.round,
        sum_sha256=hashlib.sha256(parts[0]).hexdigest(),
        contributors=signers,
        payload_sha256=hashlib.sha256(values).hexdigest(),
    )
    signed = answer.model_copy(
        update={"signature": worker.identity.sign(answer.signing_bytes()).hex()}
    )
    worker.client.ckks_decrypted(
        spec.name, item.round, pack_frame(signed.model_dump_json().encode(), values)
    )
    worker.audit.append(
        "secure.decrypt",
        actor=worker.name,
        resource=f"study/{spec.name}",
        details={"round": item.round, "contributors": len(signers)},
    )
    return f"round {item.round}: decrypted the sum of {len(signers)} contributions"


def _checked_contributions(
    spec: StudySpec,
    item: RoundWork,
    headers: list[UpdateHeader],
    ciphertexts: list[bytes],
    roster: dict[str, bytes],
) -> list[str]:
    """Names of the distinct nodes whose signed headers bind these ciphertexts to this round."""
    signers: set[str] = set()
    for header, blob in zip(headers, ciphertexts, strict=True):
        binding = (
            header.study,
            header.round,
            header.base_version,
            header.study_digest,
            header.secure,
        )
        expected = (spec.name, item.round, item.version, item.study_digest, SecureMode.CKKS)
        if binding != expected or hashlib.sha256(blob).hexdigest() != header.payload_sha256:
            raise SecureAggregationError(f"contribution of '{header.node}' is for another round")
        try:
            verify_signature(
                roster.get(header.node, b""),
                bytes.fromhex(header.signature),
                header.signing_bytes(),
            )
        except (SignatureError, ValueError) as exc:
            raise SecureAggregationError(f"contribution of '{header.node}' is not signed") from exc
        if header.node in signers:
            raise SecureAggregationError(f"'{header.node}' appears twice in the hub's sum")
        signers.add(header.node)
    return sorted(signers)
