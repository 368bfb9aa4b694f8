"""SecAgg+ rounds at the hub: dropouts and bad messages meet a dropout, a refusal, or a failed
round (see tests/secure_rounds_support.py for how the hub and its nodes are driven).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from httpx import Response

from aipipe.secure.encoding import (
    fixed_point_codec,
)
from aipipe.secure.identity import Identity
from aipipe.secure.secagg import (
    KeyAdvertisement,
    SecAggClient,
    ShareKeysReply,
)
from aipipe.secure.secagg.crypto import advert_payload
from aipipe.wire.secure import (
    SecAggAdvert,
    SecAggForwarded,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
)
from tests.e2e_support import frame, signed_update
from tests.hub_support import Hub, running_hub
from tests.secure_rounds_support import (
    DROPOUT_STAGE_S,
    NAMES,
    WAIT_S,
    SecAggParty,
    fedavg,
    refusal,
    secagg_party,
)

# -- SecAgg+: dropouts ------------------------------------------------------------------------
#
# Each scenario waits out one stage deadline, so it runs once per module and its tests read
# what happened.


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture
def at_masking(hub: Hub) -> SecAggParty:
    """Three nodes that advertised and shared keys: the round waits for their masked inputs."""
    party = secagg_party(hub, 3)
    party.advertise(*party.nodes)
    party.share(*party.nodes)
    return party


@dataclass
class Vanished:
    """A 4-node round in which node-d advertised keys, never shared them, and sent a masked
    input once the sharing stage had closed without it; the other three finished the round."""

    hub: Hub
    party: SecAggParty
    late: Response

    @property
    def survivors(self) -> list[str]:
        return list(NAMES[:3])


@pytest.fixture(scope="module")
def vanished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vanished]:
    with running_hub(tmp_path_factory.mktemp("vanished") / "hub") as hub:
        party = secagg_party(hub, 4, stage_timeout_s=DROPOUT_STAGE_S)
        survivors = NAMES[:3]
        party.advertise(*NAMES)
        party.share(*survivors)
        party.fetch("node-a", "forwarded-shares")  # answers once the sharing stage timed out
        late = party.upload("node-d", bytes(4 * party.config.vector_length))
        party.mask(*survivors)
        party.unmask(*survivors)
        yield Vanished(hub, party, late)


def test_a_node_that_advertises_keys_and_vanishes_is_dropped_and_the_others_close_the_round(
    vanished: Vanished,
) -> None:
    info = vanished.hub.round(vanished.party.at)

    assert info["state"] == "closed", info["reason"]
    assert info["reported"] == vanished.survivors


def test_the_model_after_a_dropout_is_fedavg_of_the_survivors_within_the_quantisation_error(
    vanished: Vanished,
) -> None:
    hub, party = vanished.hub, vanished.party
    at, sent = party.at, [party.sent[name] for name in vanished.survivors]

    got = hub.weights(hub.round(at)["result_version"])

    expected = fedavg(at, sent)
    options = at.spec.secure_options
    codec = fixed_point_codec(at.spec.bounds.update_norm, len(party.config.clients), options.bits)
    weight = float(np.sum([x[0] for x in sent]))
    # Decoding errs by ≤ e = n/(2·scale) on Σr and on each Σr·Δ_j, so the mean errs by
    # ≤ e·(1 + update_clip)/Σr to first order; 1e-6 covers the float32 weights.
    bound = 1.01 * codec.error_bound(len(sent)) * (1 + at.spec.bounds.update_norm) / weight + 1e-6
    for key in expected:
        assert np.max(np.abs(got[key] - expected[key])) <= bound, key
        assert not np.allclose(got[key], at.base[key]), key


def test_the_hub_audits_the_sharing_stage_with_the_node_that_vanished(vanished: Vanished) -> None:
    events = vanished.hub.events("round.stage")

    stages = {e.details["stage"]: dict(e.details) for e in events}
    assert stages["advertising"] == {"stage": "advertising", "nodes": 4, "dropped": []}
    assert stages["sharing"] == {"stage": "sharing", "nodes": 3, "dropped": ["node-d"]}


def test_a_masked_input_from_a_node_counted_as_dropped_is_refused(vanished: Vanished) -> None:
    detail = refusal(vanished.late)

    assert detail == "masked input is refused: node 'node-d' was counted as dropped before masking"


def test_a_masked_input_from_a_node_counted_as_dropped_is_audited_as_refused(
    vanished: Vanished,
) -> None:
    refused = vanished.hub.events("update.refused")

    assert [e.actor for e in refused] == ["node-d"]


@dataclass
class ShortOfMinNodes:
    """A 4-node round of a study with min_nodes=4 in which node-d never sent its masked input:
    t = 3 of 4 holders could recover the sum of the other three, but the study forbids it."""

    hub: Hub
    party: SecAggParty
    told: Response  # what node-a heard while it waited for its unmask request


@pytest.fixture(scope="module")
def short_of_min_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortOfMinNodes]:
    with running_hub(tmp_path_factory.mktemp("short") / "hub") as hub:
        party = secagg_party(hub, 4, min_nodes=4, stage_timeout_s=DROPOUT_STAGE_S)
        party.advertise(*NAMES)
        party.share(*NAMES)
        party.mask(*NAMES[:3])
        told = hub.client.get(  # a long-poll that answers when the masking stage ends
            f"{party.at.path}/secagg/unmask-request",
            params={"wait": WAIT_S},
            headers=party.nodes["node-a"].headers,
        )
        yield ShortOfMinNodes(hub, party, told)


REASON_SHORT = (
    "only 3 masked inputs; study 'secagg-faults' needs min_nodes=4, so the sum is not unmasked"
)


def test_too_few_masked_inputs_for_min_nodes_fail_the_round_with_a_reason(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    info = short_of_min_nodes.hub.round(short_of_min_nodes.party.at)

    assert (info["state"], info["reason"]) == ("failed", REASON_SHORT)


def test_nodes_waiting_to_unmask_are_told_the_round_failed(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    detail = refusal(short_of_min_nodes.told)

    assert detail == f"round 1 of 'secagg-faults' failed: {REASON_SHORT}"


def test_a_round_failed_for_too_few_masked_inputs_creates_no_model_version(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    models = short_of_min_nodes.hub.models(short_of_min_nodes.party.at.study)

    assert [m["round"] for m in models] == [0]


def test_a_round_failed_for_too_few_masked_inputs_is_audited_with_its_reason(
    short_of_min_nodes: ShortOfMinNodes,
) -> None:
    events = short_of_min_nodes.hub.events("aggregate")

    assert [(e.outcome, e.details) for e in events] == [("failure", {"reason": REASON_SHORT})]


# -- SecAgg+: bad messages --------------------------------------------------------------------


def _signed_by_another_identity(party: SecAggParty, name: str) -> KeyAdvertisement:
    impostor = SecAggClient(
        config=party.config, client_id=name, identity=Identity.generate(), roster={}
    )
    return impostor.advertise()


def _unsigned(party: SecAggParty, name: str) -> KeyAdvertisement:
    return dataclasses.replace(party.clients[name].advertise(), signature=b"")


@pytest.mark.parametrize(
    "forge", [_signed_by_another_identity, _unsigned], ids=lambda f: f.__name__.strip("_")
)
def test_a_key_advert_not_signed_by_the_nodes_identity_is_refused_and_audited(
    hub: Hub, forge: Callable[[SecAggParty, str], KeyAdvertisement]
) -> None:
    party = secagg_party(hub, 3)
    advert = forge(party, "node-a")

    response = party.post("node-a", "advert", SecAggAdvert(advert=advert))

    reason = "advert: client 'node-a': key advertisement is not signed by its identity"
    assert refusal(response) == reason
    refused = hub.events("update.refused")
    assert [(e.actor, e.details["reason"]) for e in refused] == [("node-a", reason)]


def test_a_key_advertised_in_an_earlier_round_is_refused(hub: Hub) -> None:
    first = secagg_party(hub, 3)
    first.complete()
    assert hub.round(first.at)["state"] == "closed"
    study = hub.client.get(f"/v1/studies/{first.at.study}", headers=hub.admin).json()
    second = SecAggParty.join(hub, hub.open_round(study), list(first.nodes.values()))
    old, node = first.adverts["node-a"], first.nodes["node-a"]
    round_id = second.config.round_id
    payload = advert_payload(round_id, "node-a", old.c_public, old.s_public)
    reused = KeyAdvertisement(
        round_id, "node-a", old.c_public, old.s_public, node.identity.sign(payload)
    )

    response = second.post("node-a", "advert", SecAggAdvert(advert=reused))

    assert refusal(response) == (
        "advert: client 'node-a' reuses a public key seen in an earlier round; keys must be "
        "fresh per round"
    )


def _share_for_another_round(reply: ShareKeysReply) -> ShareKeysReply:
    other = dataclasses.replace(reply.shares[0], round_id="secagg-faults/7/0000")
    return dataclasses.replace(reply, shares=(other, *reply.shares[1:]))


def _reply_for_another_round(reply: ShareKeysReply) -> ShareKeysReply:
    return dataclasses.replace(reply, round_id="secagg-faults/7/0000")


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (_share_for_another_round, "'node-a' sent a share labelled with another sender/round"),
        (_reply_for_another_round, "key shares is for round 'secagg-faults/7/0000', not"),
    ],
    ids=["one-share", "whole-reply"],
)
def test_key_shares_bound_to_another_round_are_refused(
    hub: Hub, forge: Callable[[ShareKeysReply], ShareKeysReply], reason: str
) -> None:
    party = secagg_party(hub, 3)
    party.advertise(*party.nodes)
    reply = forge(party.share_reply("node-a"))

    response = party.post("node-a", "shares", SecAggShares(reply=reply))

    assert refusal(response).startswith(f"shares: {reason}")


def test_a_masked_input_of_the_wrong_length_is_refused_with_its_length(
    at_masking: SecAggParty,
) -> None:
    short = at_masking.masked("node-a")[:-4]

    response = at_masking.upload("node-a", short)

    words = at_masking.config.vector_length
    assert refusal(response) == (
        f"masked input from 'node-a' has {len(short)} bytes; this round takes {words} words of "
        f"32 bits = {4 * words} bytes"
    )


def test_a_node_refused_for_a_wrong_length_can_still_send_its_masked_input(
    at_masking: SecAggParty,
) -> None:
    party, names = at_masking, list(at_masking.nodes)
    good = party.masked("node-a")
    refused = party.upload("node-a", good[:-4])

    accepted = party.upload("node-a", good)
    party.mask(*names[1:])
    party.unmask(*names)

    assert refused.status_code == 409
    assert accepted.status_code == 200, accepted.text
    info = party.hub.round(party.at)
    assert (info["state"], info["reported"]) == ("closed", names)


def _unmask_all_but_the_last(party: SecAggParty) -> str:
    """Every node but the last answers its unmask request; the last node's name."""
    *first, last = party.nodes
    party.unmask(*first)
    return last


def test_a_masked_input_outside_the_codecs_range_fails_the_round_at_unmasking(
    at_masking: SecAggParty,
) -> None:
    party = at_masking
    *honest, rogue = party.nodes
    party.mask(*honest)
    forwarded = SecAggForwarded.model_validate_json(party.fetch(rogue, "forwarded-shares"))
    words = np.full(party.config.vector_length, 2**31 + 2**20, np.uint32)  # ≈ −2^31: no clipped x
    assert party.upload(rogue, party.clients[rogue].mask(forwarded.shares, words).data).is_success
    last = _unmask_all_but_the_last(party)
    request = SecAggUnmaskRequest.model_validate_json(party.fetch(last, "unmask-request"))

    party.post(last, "unmask", SecAggUnmask(reply=party.clients[last].unmask(request.request)))

    info = party.hub.round(party.at)
    assert info["state"] == "failed"
    assert "sum exceeds the range of 3 clipped inputs" in info["reason"]


def test_an_unmask_share_outside_the_field_is_refused_and_audited(
    at_masking: SecAggParty,
) -> None:
    party = at_masking
    party.mask(*party.nodes)
    last = _unmask_all_but_the_last(party)
    request = SecAggUnmaskRequest.model_validate_json(party.fetch(last, "unmask-request"))
    reply = party.clients[last].unmask(request.request)
    corrupt = dataclasses.replace(reply.b_shares[0], data=b"\xff" * len(reply.b_shares[0].data))
    forged = dataclasses.replace(reply, b_shares=(corrupt, *reply.b_shares[1:]))

    detail = refusal(party.post(last, "unmask", SecAggUnmask(reply=forged)))

    assert f"'{last}' revealed a malformed b-share" in detail
    assert [e.actor for e in party.hub.events("update.refused")] == [last]
    assert party.hub.round(party.at)["state"] != "closed"


def test_a_plaintext_update_to_a_secagg_study_is_refused_and_audited(hub: Hub) -> None:
    party = secagg_party(hub, 3)
    node, at = party.nodes["node-a"], party.at
    header, payload = signed_update(
        node.identity,
        node=node.name,
        study=at.study,
        study_digest=at.digest,
        round=at.number,
        base_version=at.base_version,
        delta={k: np.full_like(v, 0.01) for k, v in at.base.items()},
    )

    response = hub.upload(node, at, frame(header, payload))

    reason = "study 'secagg-faults' takes secure: secagg updates; this one is none"
    assert refusal(response) == reason
    assert [e.details["reason"] for e in hub.events("update.refused")] == [reason]
