"""What a node refuses in a secure round: a SecAgg+ config its study does not imply, unmasking
fewer than min_nodes inputs, and decrypting a CKKS sum it cannot vouch for — each against a
hand-written stand-in for `HubClient`, with a control test that the honest answer is accepted.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.node.secagg_node import checked_config
from aipipe.node.secure_rounds import ckks_decrypt, secagg_round
from aipipe.secure.ckks import (
    CkksContext,
    EncryptedVector,
    sum_encrypted,
)
from aipipe.secure.encoding import (
    FloatArray,
)
from aipipe.secure.errors import SecAggProtocolError, SecureAggregationError
from aipipe.secure.identity import Identity
from aipipe.secure.secagg import (
    SecAggConfig,
)
from aipipe.study.spec import StudySpec
from aipipe.wire import (
    RoundWork,
    UpdateHeader,
    pack_frame,
    unpack_frame,
)
from aipipe.wire.secure import (
    DecryptBundleHeader,
    DecryptedSum,
    Keyring,
    KeyringEntry,
    SecAggRoundConfig,
)
from aipipe.wire.tensors import decode_arrays
from tests.hub_support import Round
from tests.secure_rounds_support import (
    CKKS_PRECISION,
    NAMES,
    SMALL_MODEL,
    ScriptedSecAggHub,
    _train,
    contribution_of,
    new_context,
    node_worker,
    secure_header,
    secure_spec,
)

# -- SecAgg+: what a node refuses to take part in ---------------------------------------------


def _config(spec: StudySpec, clients: int, **changes: Any) -> SecAggRoundConfig:
    """The config an honest hub announces for `clients` nodes, with `changes` made to it."""
    config = SecAggConfig.create(
        round_id=f"{spec.name}/1/{'0' * 16}",
        clients=[f"node-{letter}" for letter in "abcdef"[:clients]],
        vector_length=15,
    )
    fields = {
        "round_id": config.round_id,
        "clients": list(config.clients),
        "vector_length": config.vector_length,
        "neighbours": config.neighbours,
        "threshold": config.threshold,
        "bits": config.bits,
    }
    return SecAggRoundConfig.model_validate({**fields, **changes})


def test_a_round_config_that_matches_the_study_is_accepted() -> None:
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg"))
    message = _config(spec, 4)

    config = checked_config(spec, message, "node-a", 1, 15)

    assert (config.clients, config.threshold) == (tuple(message.clients), 3)


@pytest.mark.parametrize(
    ("clients", "changes", "min_nodes", "problem"),
    [
        (6, {"threshold": 4}, 3, "threshold t=4 is below 5"),
        (4, {"vector_length": 16}, 3, "its vectors are not 15 long"),
        (3, {}, 4, "it has fewer than min_nodes=4 nodes"),
    ],
    ids=["threshold-below-default", "wrong-vector-length", "fewer-than-min-nodes"],
)
def test_a_node_refuses_a_round_config_its_study_does_not_imply(
    clients: int, changes: dict[str, Any], min_nodes: int, problem: str
) -> None:
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg", min_nodes=min_nodes))
    message = _config(spec, clients, **changes)

    with pytest.raises(SecAggProtocolError) as refused:
        checked_config(spec, message, "node-a", 1, 15)

    assert str(refused.value) == f"refusing the hub's SecAgg+ round: {problem}"


def _secagg_round_losing_one_of_four(
    tmp_path: Path, min_nodes: int
) -> tuple[Any, ScriptedSecAggHub]:
    """(what `secagg_round` returned or raised, the hub) for a 4-node round losing one node."""
    spec = StudySpec.model_validate(secure_spec("secagg-faults", "secagg", min_nodes=min_nodes))
    identities = {n: Identity.generate() for n in NAMES}
    config = SecAggConfig.create(
        round_id=f"{spec.name}/1/{'0' * 16}", clients=list(NAMES), vector_length=5
    )
    scripted = ScriptedSecAggHub(config, "node-a", identities)
    item = RoundWork(
        kind="train",
        study=spec.name,
        study_digest="d" * 64,
        round=1,
        version="b" * 64,
        deadline="2999-01-01T00:00:00Z",
    )
    with node_worker(tmp_path / "node-a", "node-a", identities["node-a"], scripted) as worker:
        try:
            outcome: Any = secagg_round(worker, spec, item, _train, None)
        except SecureAggregationError as exc:
            outcome = exc
    return outcome, scripted


def test_a_node_answers_an_unmask_request_with_min_nodes_survivors(tmp_path: Path) -> None:
    outcome, scripted = _secagg_round_losing_one_of_four(tmp_path, min_nodes=3)

    assert outcome == "round 1: secagg update sent and unmasked with 3 survivors"
    assert scripted.posted == ["advert", "shares", "unmask"]


def test_a_node_refuses_to_unmask_a_sum_of_fewer_than_min_nodes_inputs(tmp_path: Path) -> None:
    outcome, scripted = _secagg_round_losing_one_of_four(tmp_path, min_nodes=4)

    assert isinstance(outcome, SecAggProtocolError)
    assert str(outcome) == (
        "the hub asks to unmask a sum of 3 inputs; study 'secagg-faults' needs min_nodes=4, "
        "so this node reveals nothing"
    )
    assert "unmask" not in scripted.posted


# -- CKKS: a key holder refuses to decrypt a sum it cannot vouch for --------------------------


@dataclass
class CraftedHub:
    """Stands in for `HubClient` in `ckks_decrypt`: hands out one crafted bundle and keeps
    whatever decrypted sum the node posts back."""

    bundle: bytes
    roster: dict[str, bytes]
    answers: list[bytes] = field(default_factory=list)

    def ckks_bundle(self, study: str, number: int) -> bytes:
        return self.bundle

    def keyring(self) -> Keyring:
        return Keyring(nodes=[KeyringEntry(node=n, identity_key=k) for n, k in self.roster.items()])

    def ckks_decrypted(self, study: str, number: int, body: bytes) -> None:
        self.answers.append(body)


@dataclass
class Contribution:
    header: UpdateHeader
    ciphertext: bytes
    x: FloatArray


@dataclass
class KeyHolder:
    """Three sites' signed ciphertexts for round 1 of a CKKS study, and what a bundle holds."""

    tmp_path: Path
    at: Round
    context: CkksContext
    identities: dict[str, Identity]
    contributions: dict[str, Contribution]

    def bundle(self, total: bytes, names: list[str]) -> bytes:
        parts = [self.contributions[n] for n in names]
        head = DecryptBundleHeader(
            contributions=[p.header for p in parts],
            sizes=[len(total)] + [len(p.ciphertext) for p in parts],
        )
        return pack_frame(
            head.model_dump_json().encode(), total + b"".join(p.ciphertext for p in parts)
        )

    def true_sum(self, names: list[str]) -> bytes:
        vectors = [EncryptedVector.from_bytes(self.contributions[n].ciphertext) for n in names]
        return sum_encrypted(self.context.public(), vectors).to_bytes()

    def decrypt(self, bundle: bytes) -> tuple[Any, CraftedHub]:
        """(what `ckks_decrypt` returned or raised, the hub) for node-a given `bundle`."""
        roster = {n: i.public_bytes for n, i in self.identities.items()}
        hub = CraftedHub(bundle, roster)
        item = RoundWork(
            kind="decrypt",
            study=self.at.study,
            study_digest=self.at.digest,
            round=self.at.number,
            version=self.at.base_version,
        )
        home = self.tmp_path / f"node-a-{secrets.token_hex(4)}"
        with node_worker(home, "node-a", self.identities["node-a"], hub) as worker:
            assert worker.vault is not None
            worker.vault.save_context(self.at.study, self.context)
            try:
                outcome: Any = ckks_decrypt(worker, self.at.spec, item)
            except SecureAggregationError as exc:
                outcome = exc
        return outcome, hub


@pytest.fixture(scope="module")
def key_holder(tmp_path_factory: pytest.TempPathFactory) -> KeyHolder:
    spec = StudySpec.model_validate(secure_spec("ckks-faults", "ckks"))
    at = Round(spec.name, spec.digest(), 1, "b" * 64, dict(SMALL_MODEL), spec)
    context = new_context()
    identities = {n: Identity.generate() for n in NAMES[:3]}
    contributions = {}
    for name, identity in identities.items():
        x = contribution_of(name, at)
        ciphertext = context.encrypt(x).to_bytes()
        header = secure_header(name, identity, at, ciphertext, "ckks")
        contributions[name] = Contribution(header, ciphertext, x)
    return KeyHolder(tmp_path_factory.mktemp("ckks"), at, context, identities, contributions)


def test_a_key_holder_decrypts_the_true_sum_of_min_nodes_signed_contributions(
    key_holder: KeyHolder,
) -> None:
    names = list(NAMES[:3])

    outcome, hub = key_holder.decrypt(key_holder.bundle(key_holder.true_sum(names), names))

    assert outcome == "round 1: decrypted the sum of 3 contributions"
    head_json, values = unpack_frame(hub.answers[0])
    head = DecryptedSum.model_validate_json(head_json)
    assert head.contributors == names
    expected = np.sum([key_holder.contributions[n].x for n in names], axis=0)
    np.testing.assert_allclose(decode_arrays(values)["sum"], expected, atol=CKKS_PRECISION)


def test_a_key_holder_refuses_a_sum_of_fewer_than_min_nodes_contributions(
    key_holder: KeyHolder,
) -> None:
    names = list(NAMES[:2])

    outcome, hub = key_holder.decrypt(key_holder.bundle(key_holder.true_sum(names), names))

    assert isinstance(outcome, SecureAggregationError)
    assert str(outcome) == (
        "the hub's sum holds 2 signed contributions; study 'ckks-faults' needs min_nodes=3, "
        "so this node does not decrypt it"
    )
    assert hub.answers == []


def test_a_key_holder_refuses_one_nodes_ciphertext_passed_off_as_the_sum(
    key_holder: KeyHolder,
) -> None:
    names = list(NAMES[:3])
    lone = key_holder.contributions["node-b"].ciphertext

    outcome, hub = key_holder.decrypt(key_holder.bundle(lone, names))

    assert isinstance(outcome, SecureAggregationError)
    assert str(outcome) == "the hub's sum is not the sum of the signed contributions"
    assert hub.answers == []


def test_a_key_holder_refuses_a_sum_listing_one_contribution_twice(key_holder: KeyHolder) -> None:
    names = ["node-a", "node-b", "node-b"]

    outcome, hub = key_holder.decrypt(key_holder.bundle(key_holder.true_sum(names), names))

    assert isinstance(outcome, SecureAggregationError)
    assert str(outcome) == "'node-b' appears twice in the hub's sum"
    assert hub.answers == []
