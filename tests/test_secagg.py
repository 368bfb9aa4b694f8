"""SecAgg+: Shamir, the neighbour graph, masks that cancel, dropouts, and every refusal."""

from __future__ import annotations

import dataclasses
import itertools
import os
import secrets
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aipipe.secure.errors import SecAggProtocolError, SecAggRoundFailedError, UnmaskRefusedError
from aipipe.secure.identity import Identity
from aipipe.secure.secagg import (
    NeighbourKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskRequest,
    crypto,
    default_threshold,
    neighbour_graph,
)
from aipipe.secure.secagg.simulate import Dropouts, run_round

LENGTH = 64


def names(n: int) -> list[str]:
    return [f"h{i:02d}" for i in range(n)]


def identities(n: int) -> dict[str, Identity]:
    return {c: Identity.generate() for c in names(n)}


def random_inputs(config: SecAggConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        c: rng.integers(0, 2**32, config.vector_length, dtype=np.uint64).astype(np.uint32)
        for c in config.clients
    }


def exact_sum(inputs: dict[str, np.ndarray], who: tuple[str, ...]) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for c in who:
        total += inputs[c]  # uint32 wraps: the sum mod 2^32
    return total


class Round:
    """A server and its clients, driven stage by stage so tests can step in between."""

    def __init__(self, n: int = 5, round_id: str = "r1", **config: int) -> None:
        self.ids = identities(n)
        self.roster = {c: i.public_bytes for c, i in self.ids.items()}
        self.config = SecAggConfig.create(
            round_id=round_id, clients=list(self.ids), vector_length=LENGTH, **config
        )
        self.server = SecAggServer(config=self.config, roster=self.roster)
        self.clients = {
            c: SecAggClient(config=self.config, client_id=c, identity=i, roster=self.roster)
            for c, i in self.ids.items()
        }
        self.inputs = random_inputs(self.config)

    def advertise(self) -> None:
        self.adverts = {c: client.advertise() for c, client in self.clients.items()}
        for advert in self.adverts.values():
            self.server.receive_advertisement(advert)
        self.server.close_advertising()

    def share(self) -> None:
        self.advertise()
        for c, client in self.clients.items():
            self.server.receive_shares(client.share_keys(self.server.neighbour_keys(c)))
        self.server.close_sharing()

    def mask(self, skip: frozenset[str] = frozenset()) -> None:
        self.share()
        for c, client in self.clients.items():
            if c not in skip:
                fwd = self.server.forwarded_shares(c)
                self.server.receive_masked_input(client.mask(fwd, self.inputs[c]))
        self.server.close_masking()


# Shamir ------------------------------------------------------------------------------------


def shamir_points(shares: list[bytes], chosen: Iterable[int]) -> list[tuple[int, bytes]]:
    """The (x, share) pairs of the chosen share positions; share i sits at x = i + 1."""
    return [(i + 1, shares[i]) for i in chosen]


@pytest.mark.parametrize(
    "secret",
    [bytes(16), b"\x00" * 15 + b"\x01", b"\xff" * 16, os.urandom(16), bytes(32), b"\xff" * 32],
    ids=["zero-16", "leading-zeros-16", "max-16", "random-16", "zero-32", "max-32"],
)
def test_a_secret_of_16_or_32_bytes_round_trips_through_fixed_size_shares(secret: bytes) -> None:
    shares = crypto.split_secret(secret, 3, 5)
    assert all(len(share) == crypto.SHARE_BYTES == 66 for share in shares)
    rebuilt = crypto.combine_secret(shamir_points(shares, range(3)), 3, "test", size=len(secret))
    assert rebuilt == secret


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(2, 8),
    extra=st.integers(0, 5),
    size=st.sampled_from([crypto.SEED_BYTES, crypto.KEY_BYTES]),
    data=st.data(),
)
def test_any_t_or_more_shares_in_any_order_rebuild_the_secret(
    t: int, extra: int, size: int, data: st.DataObject
) -> None:
    secret = os.urandom(size)
    shares = crypto.split_secret(secret, t, t + extra)
    chosen = data.draw(st.permutations(range(t + extra)))[: data.draw(st.integers(t, t + extra))]
    picked = shamir_points(shares, chosen)
    assert crypto.combine_secret(picked, t, "test secret", size=size) == secret


def test_every_t_subset_of_seven_shares_rebuilds_the_same_secret() -> None:
    secret = os.urandom(crypto.KEY_BYTES)
    shares = crypto.split_secret(secret, 4, 7)
    rebuilt = {
        crypto.combine_secret(shamir_points(shares, subset), 4, "test", size=crypto.KEY_BYTES)
        for subset in itertools.combinations(range(7), 4)
    }
    assert rebuilt == {secret}


@settings(max_examples=40, deadline=None)
@given(t=st.integers(2, 8), extra=st.integers(0, 4), data=st.data())
def test_fewer_than_t_distinct_shares_fail_the_round_instead_of_giving_a_secret(
    t: int, extra: int, data: st.DataObject
) -> None:
    shares = crypto.split_secret(os.urandom(crypto.SEED_BYTES), t, t + extra)
    chosen = data.draw(st.lists(st.integers(0, t + extra - 1), max_size=t - 1, unique=True))
    repeated = shamir_points(shares, chosen) * 2  # the same x twice counts once
    with pytest.raises(SecAggRoundFailedError, match=f"{len(chosen)} shares but {t} are needed"):
        crypto.combine_secret(repeated, t, "test secret", size=crypto.SEED_BYTES)


def test_t_minus_1_shares_interpolate_to_an_unrelated_value_that_is_refused() -> None:
    secret = os.urandom(crypto.SEED_BYTES)
    shares = crypto.split_secret(secret, 4, 6)
    # Asked to trust 3 points of a degree-3 polynomial, interpolation lands on a random element
    # of F_p, far outside 16 bytes: the range check refuses it rather than return a wrong seed.
    with pytest.raises(SecAggRoundFailedError, match="corrupt share"):
        crypto.combine_secret(shamir_points(shares, range(3)), 3, "test", size=crypto.SEED_BYTES)


@pytest.mark.parametrize("size", [crypto.SEED_BYTES, crypto.KEY_BYTES])
@pytest.mark.parametrize("victim", [0, 3])
@pytest.mark.parametrize("corruption", ["share-of-another-secret", "random-element"])
def test_a_share_set_with_a_foreign_or_garbled_share_is_refused_as_corrupt(
    size: int, victim: int, corruption: str
) -> None:
    shares = crypto.split_secret(os.urandom(size), 4, 6)
    if corruption == "share-of-another-secret":  # a holder mixes up owners or rounds
        shares[victim] = crypto.split_secret(os.urandom(size), 4, 6)[victim]
    else:  # garbled in storage, still below p
        shares[victim] = secrets.randbelow(crypto.PRIME).to_bytes(crypto.SHARE_BYTES, "big")
    # The error moves f(0) by a uniform element of F_p, so the result leaves `size` bytes with
    # probability 1 − 2^-265 or more. (A small chosen offset would pass; see crypto.PRIME.)
    with pytest.raises(SecAggRoundFailedError, match="a holder revealed a corrupt share"):
        crypto.combine_secret(shamir_points(shares, range(4)), 4, "test", size=size)


@pytest.mark.parametrize(
    ("bad_share", "message"),
    [
        (bytes(16), "a share of 16 bytes, not 66"),
        (bytes(67), "a share of 67 bytes, not 66"),
        (b"\xff" * 66, "not a point of F_p"),
    ],
    ids=["old-16-byte-share", "too-long", "not-below-p"],
)
def test_malformed_shares_are_refused_as_a_protocol_error(bad_share: bytes, message: str) -> None:
    shares = crypto.split_secret(os.urandom(crypto.SEED_BYTES), 3, 4)
    shares[1] = bad_share
    with pytest.raises(SecAggProtocolError, match=message):
        crypto.combine_secret(shamir_points(shares, range(4)), 3, "test", size=crypto.SEED_BYTES)


def test_a_share_at_x_zero_is_refused_because_it_would_be_the_secret() -> None:
    shares = crypto.split_secret(os.urandom(crypto.SEED_BYTES), 2, 3)
    with pytest.raises(SecAggProtocolError, match="x = 0"):
        crypto.combine_secret([(0, shares[0]), (2, shares[1])], 2, "test", size=16)


# Graph and configuration -------------------------------------------------------------------


def test_the_sparse_graph_is_k_regular_symmetric_and_fixed_by_the_round_id() -> None:
    clients = tuple(names(40))
    graph = neighbour_graph("r1", clients, 12)
    assert all(len(peers) == 12 and c not in peers for c, peers in graph.items())
    assert all(c in graph[v] for c, peers in graph.items() for v in peers)
    assert graph == neighbour_graph("r1", clients, 12)
    assert graph != neighbour_graph("r2", clients, 12)


def test_small_rounds_use_the_complete_graph_and_a_two_thirds_threshold() -> None:
    config = SecAggConfig.create(round_id="r", clients=names(10), vector_length=4)
    assert config.neighbours == 9
    assert config.threshold == 7 == default_threshold(9)
    assert all(len(peers) == 9 for peers in config.graph.values())


@pytest.mark.parametrize(
    ("n", "changes", "message"),
    [
        (2, {}, "fewer than 3"),
        (20, {"neighbours": 7}, "even k"),
        (10, {"threshold": 5}, "threshold t=5"),
    ],
)
def test_unsafe_round_settings_are_refused(n: int, changes: dict[str, int], message: str) -> None:
    with pytest.raises(SecAggProtocolError, match=message):
        SecAggConfig.create(round_id="r", clients=names(n), vector_length=4, **changes)


# Masks cancel ------------------------------------------------------------------------------


def test_masks_cancel_and_the_server_gets_exactly_the_sum_without_dropouts() -> None:
    rnd = Round(n=6)
    rnd.mask()
    for c in rnd.clients:
        rnd.server.receive_unmask(rnd.clients[c].unmask(rnd.server.unmask_request(c)))
    result = rnd.server.finish()
    assert result.contributors == rnd.config.clients
    np.testing.assert_array_equal(result.total, exact_sum(rnd.inputs, rnd.config.clients))


def test_a_masked_input_reveals_nothing_like_the_input() -> None:
    rnd = Round(n=4)
    rnd.share()
    c = rnd.config.clients[0]
    zeros = np.zeros(LENGTH, dtype=np.uint32)
    masked = rnd.clients[c].mask(rnd.server.forwarded_shares(c), zeros)
    words = np.frombuffer(masked.data, dtype="<u4")
    assert np.count_nonzero(words) > LENGTH - 2  # uniform words, not the all-zero input


@pytest.mark.parametrize("dropped", [1, 3])
def test_the_round_survives_dropouts_after_key_sharing(dropped: int) -> None:
    ids = identities(10)
    config = SecAggConfig.create(round_id="r", clients=list(ids), vector_length=LENGTH)
    assert dropped <= 10 - config.threshold  # 3 = n − t
    inputs = random_inputs(config)
    gone = frozenset(config.clients[:dropped])
    result = run_round(config, ids, inputs, Dropouts(before_masking=gone))
    survivors = tuple(c for c in config.clients if c not in gone)
    assert result.contributors == survivors
    np.testing.assert_array_equal(result.total, exact_sum(inputs, survivors))


def test_more_than_n_minus_t_dropouts_fail_the_round_clearly() -> None:
    ids = identities(10)
    config = SecAggConfig.create(round_id="r", clients=list(ids), vector_length=LENGTH)
    gone = frozenset(config.clients[: 10 - config.threshold + 1])
    with pytest.raises(SecAggRoundFailedError, match="only 6 clients sent masked inputs"):
        run_round(config, ids, random_inputs(config), Dropouts(before_masking=gone))


def test_survivors_that_vanish_before_unmasking_are_still_summed() -> None:
    ids = identities(10)
    config = SecAggConfig.create(round_id="r", clients=list(ids), vector_length=LENGTH)
    inputs = random_inputs(config)
    result = run_round(config, ids, inputs, Dropouts(before_unmasking=frozenset({"h04", "h08"})))
    assert result.contributors == config.clients
    np.testing.assert_array_equal(result.total, exact_sum(inputs, config.clients))


def test_a_client_that_advertises_and_vanishes_before_sharing_is_left_out() -> None:
    ids = identities(6)
    config = SecAggConfig.create(round_id="r", clients=list(ids), vector_length=LENGTH)
    inputs = random_inputs(config)
    result = run_round(config, ids, inputs, Dropouts(before_sharing=frozenset({"h02"})))
    assert result.dropped == ("h02",)
    np.testing.assert_array_equal(result.total, exact_sum(inputs, result.contributors))


# Refusals ----------------------------------------------------------------------------------


def test_a_share_bound_to_another_round_does_not_decrypt() -> None:
    key = os.urandom(32)
    share = bytes(crypto.SHARE_BYTES)
    sealed = crypto.seal_share(key, crypto.share_ad("r1", "a", "b"), 1, share, share)
    assert crypto.open_share(key, crypto.share_ad("r1", "a", "b"), sealed)[0] == 1
    with pytest.raises(SecAggProtocolError, match="does not decrypt"):
        crypto.open_share(key, crypto.share_ad("r2", "a", "b"), sealed)


def test_a_client_refuses_shares_from_another_round() -> None:
    old, new = Round(n=4, round_id="r1"), Round(n=4, round_id="r2")
    old.share()
    new.share()
    c = new.config.clients[0]
    stale = old.server.forwarded_shares(c)
    relabelled = dataclasses.replace(
        stale,
        round_id="r2",
        shares=tuple(dataclasses.replace(s, round_id="r2") for s in stale.shares),
    )
    with pytest.raises(SecAggProtocolError, match="does not decrypt"):
        new.clients[c].mask(relabelled, new.inputs[c])


def test_a_masked_vector_of_the_wrong_length_is_refused() -> None:
    rnd = Round(n=4)
    rnd.share()
    c = rnd.config.clients[0]
    masked = rnd.clients[c].mask(rnd.server.forwarded_shares(c), rnd.inputs[c])
    short = dataclasses.replace(masked, data=masked.data[:-4])
    with pytest.raises(SecAggProtocolError, match="takes 64 words"):
        rnd.server.receive_masked_input(short)


def test_a_client_refuses_to_mask_an_input_of_the_wrong_length() -> None:
    rnd = Round(n=4)
    rnd.share()
    c = rnd.config.clients[0]
    with pytest.raises(SecAggProtocolError, match="takes"):
        rnd.clients[c].mask(rnd.server.forwarded_shares(c), rnd.inputs[c][:-1])


def test_an_advert_signed_by_another_key_is_refused() -> None:
    rnd = Round(n=4)
    c = rnd.config.clients[0]
    advert = rnd.clients[c].advertise()
    forged = dataclasses.replace(advert, signature=Identity.generate().sign(b"anything"))
    with pytest.raises(SecAggProtocolError, match="not signed by its identity"):
        rnd.server.receive_advertisement(forged)


def test_a_public_key_seen_in_an_earlier_round_is_refused() -> None:
    first = Round(n=4, round_id="r1")
    first.advertise()
    old = first.adverts["h00"]
    # A client that reuses last round's keys, correctly signed for the new round.
    payload = crypto.advert_payload("r2", "h00", old.c_public, old.s_public)
    replay = dataclasses.replace(old, round_id="r2", signature=first.ids["h00"].sign(payload))
    config = dataclasses.replace(first.config, round_id="r2")
    ledger = first.server.used_public_keys
    server = SecAggServer(config=config, roster=first.roster, seen_public_keys=ledger)
    with pytest.raises(SecAggProtocolError, match="reuses a public key"):
        server.receive_advertisement(replay)
    client = SecAggClient(
        config=config,
        client_id="h01",
        identity=first.ids["h01"],
        roster=first.roster,
        seen_public_keys=ledger,
    )
    client.advertise()
    with pytest.raises(SecAggProtocolError, match="reuses a public key"):
        client.share_keys(NeighbourKeys("r2", "h01", (replay,)))


def test_two_clients_advertising_the_same_key_are_refused() -> None:
    rnd = Round(n=4)
    a = rnd.clients["h00"].advertise()
    b = rnd.clients["h01"].advertise()
    payload = crypto.advert_payload("r1", "h01", a.c_public, b.s_public)
    copy = dataclasses.replace(b, c_public=a.c_public, signature=rnd.ids["h01"].sign(payload))
    rnd.server.receive_advertisement(a)
    with pytest.raises(SecAggProtocolError, match="already in use"):
        rnd.server.receive_advertisement(copy)


def _unmask_request_for(rnd: Round, c: str) -> UnmaskRequest:
    rnd.mask(skip=frozenset({"h04"}))
    request = rnd.server.unmask_request(c)
    assert request.dropped == ("h04",)
    return request


def test_a_client_refuses_to_reveal_both_shares_of_one_neighbour() -> None:
    rnd = Round(n=5)
    request = _unmask_request_for(rnd, "h00")
    greedy = dataclasses.replace(request, survivors=(*request.survivors, "h04"))
    with pytest.raises(UnmaskRefusedError, match=r"both shares of \['h04'\]"):
        rnd.clients["h00"].unmask(greedy)


def test_a_client_answers_only_one_unmask_request() -> None:
    rnd = Round(n=5)
    request = _unmask_request_for(rnd, "h00")
    rnd.clients["h00"].unmask(request)
    # The same neighbour, now claimed to have survived: asking again would reveal its b-share.
    flipped = dataclasses.replace(request, survivors=(*request.survivors, "h04"), dropped=())
    with pytest.raises(UnmaskRefusedError, match="already answered"):
        rnd.clients["h00"].unmask(flipped)


def test_an_unmask_request_that_hides_a_neighbour_is_refused() -> None:
    rnd = Round(n=5)
    request = _unmask_request_for(rnd, "h00")
    with pytest.raises(SecAggProtocolError, match="does not match"):
        rnd.clients["h00"].unmask(dataclasses.replace(request, dropped=()))


def _reveal_all(rnd: Round, tamper: Callable[[bytes], bytes]) -> None:
    """Every client answers its unmask request; h00 (x = 1 for every owner) tampers its b-shares."""
    rnd.mask()
    for c, client in rnd.clients.items():
        reply = client.unmask(rnd.server.unmask_request(c))
        if c == "h00":
            b_shares = tuple(dataclasses.replace(b, data=tamper(b.data)) for b in reply.b_shares)
            reply = dataclasses.replace(reply, b_shares=b_shares)
        rnd.server.receive_unmask(reply)


def test_a_corrupt_revealed_b_share_fails_the_round_instead_of_a_wrong_sum() -> None:
    rnd = Round(n=5)
    garbage = secrets.randbelow(crypto.PRIME).to_bytes(crypto.SHARE_BYTES, "big")
    _reveal_all(rnd, lambda _: garbage)
    with pytest.raises(SecAggRoundFailedError, match=r"mask seed of 'h00'.*corrupt share"):
        rnd.server.finish()


def test_a_revealed_share_of_the_old_16_byte_size_is_refused_as_malformed() -> None:
    rnd = Round(n=5)
    with pytest.raises(SecAggProtocolError, match="'h00' revealed a malformed b-share"):
        _reveal_all(rnd, lambda data: data[:16])


def test_stages_out_of_order_are_refused() -> None:
    rnd = Round(n=4)
    rnd.advertise()
    with pytest.raises(SecAggProtocolError, match="out of order"):
        rnd.clients["h00"].unmask(UnmaskRequest("r1", "h00", ("h00",), ()))
    with pytest.raises(SecAggProtocolError, match="refused: the round is sharing"):
        rnd.server.finish()


# Property ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_round_returns_the_exact_sum_of_its_contributors_or_fails_clearly(
    data: st.DataObject,
) -> None:
    n = data.draw(st.integers(3, 14), label="n")
    k = data.draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]), label="k")
    ids = identities(n)
    config = SecAggConfig.create(
        round_id=f"r{n}-{k}", clients=list(ids), vector_length=16, neighbours=k
    )
    clients = list(config.clients)
    # Mostly no dropout, so that many rounds succeed and the sum is checked.
    stage = st.sampled_from([None] * 8 + ["adv", "share", "mask", "unmask"])
    plan = {c: data.draw(stage, label=f"drop {c}") for c in clients}
    dropouts = Dropouts(
        *(
            frozenset(c for c, s in plan.items() if s == name)
            for name in ("adv", "share", "mask", "unmask")
        )
    )
    inputs = random_inputs(config, seed=n)
    try:
        result = run_round(config, ids, inputs, dropouts)
    except SecAggRoundFailedError:
        assert any(plan.values()), "a round without dropouts must succeed"
        event("round failed")
        return
    event("round succeeded")
    assert len(result.contributors) >= config.threshold
    assert not set(result.contributors) & {
        c for c, s in plan.items() if s in ("adv", "share", "mask")
    }
    np.testing.assert_array_equal(result.total, exact_sum(inputs, result.contributors))
