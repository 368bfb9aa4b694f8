"""Checks on a secure federation's outcome: what each node recorded it sent, the hub's models,
and the plaintext FedAvg of those contributions (test_secure_e2e, test_secagg_hub_restart_e2e)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from aipipe.secure.encoding import UpdateLayout, mean_from_sum
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import Federation


def sent(fed: Federation, site: str, study: str) -> npt.NDArray[np.float64]:
    path = fed.nodes[site] / "secure" / "sent" / study / "round-1.safetensors"
    return decode_arrays(path.read_bytes())["x"]


def model(fed: Federation, version: str) -> dict[str, npt.NDArray[Any]]:
    with fed.admin() as client:
        return decode_arrays(client.get(f"/v1/models/{version}/weights").content)


def fedavg(fed: Federation, info: dict[str, Any], contributors: list[str]) -> dict[str, Any]:
    """Plaintext FedAvg (server lr 1) of the contributions the nodes recorded."""
    base = model(fed, info["base_version"])
    total = np.sum([sent(fed, site, info["study"]) for site in contributors], axis=0)
    weighted, examples = mean_from_sum(total, layout=UpdateLayout.of(base), max_examples=1000)
    return {k: base[k] + weighted[k] / examples for k in base}
