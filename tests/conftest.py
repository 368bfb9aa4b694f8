"""Fixtures that several test modules share.

- `one_torch_thread`: modules that train tiny models ask for it with
  `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
- `store`: an empty node store in tmp_path (pseudonym key `b"k" * 32`).
- `hub`: a real hub app in-process, in tmp_path (tests/hub_support.py's `running_hub`); modules
  whose hub needs more (test_hub_app, test_hardening_cli, the secure-round modules) define
  their own.
  `pair`: nodes alpha and beta enrolled at whichever `hub` the module has.
- `owner` (a fresh signing identity) and `log_path` (where an audit log goes in tmp_path), for the
  audit-log tests; their helpers are in tests/audit_support.py.
- The CDS service in-process (tests/test_cds_*.py): `heart` and `scorer` (a logistic model
  trained on Cleveland's heart data, once per session: nothing changes them), `records` (the
  Cleveland patients' resources by patient id, once per module), `fhir` (a mock FHIR server over
  them), `audit`, `client` (the CDS app over all of these), and the `es384`/`rs384` JWT signers.
  Their helpers are in tests/cds_support.py. test_cds_cards.py and test_cds_prefetch_paging.py
  define a `scorer` of their own, which takes precedence there.
- `fhir_server`: one real FHIR server for the session (tests/fhir_server.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from aipipe.audit import AuditLog
from aipipe.cds import PatientScorer
from aipipe.models import build_model
from aipipe.models.training import train_local
from aipipe.node.ingest import ingest_files
from aipipe.secure.identity import Identity
from aipipe.store.node_store import NodeStore
from aipipe.study.blocks import Privacy, Training
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec, load_study
from tests.cds_support import (
    CLEVELAND,
    KEY,
    ROOT,
    VERSION,
    Fhir,
    Signer,
    cleveland_records,
    make_client,
)
from tests.fhir_server import fhir_server as fhir_server  # the session fixture
from tests.hub_support import Hub, Node, running_hub


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a busy shared machine the thread
    # pool's hand-offs cost more than the maths: one thread keeps these tests fast and steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    opened = NodeStore.open(tmp_path / "store.sqlite", b"k" * 32)
    yield opened
    opened.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture
def pair(hub: Hub) -> tuple[Node, Node]:
    return hub.enrol("alpha"), hub.enrol("beta")


@pytest.fixture
def owner() -> Identity:
    return Identity.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite"


# -- the CDS service in-process -----------------------------------------------------------------


@pytest.fixture(scope="session")
def heart() -> StudySpec:
    return load_study(ROOT / "examples" / "heart-disease" / "study.yaml")


@pytest.fixture(scope="session")
def scorer(heart: StudySpec, tmp_path_factory: pytest.TempPathFactory) -> PatientScorer:
    store = NodeStore.open(tmp_path_factory.mktemp("node") / "store.sqlite", KEY)
    ingest_files(store, [CLEVELAND])
    matrix = extract(store, heart)
    store.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(heart.model, len(matrix.columns), seed=0)
    result = train_local(
        model,
        matrix.x_train,
        matrix.y_train,
        training=Training(local_steps=200, batch_size=32, lr=0.05),
        privacy=Privacy(mode="none"),
        noise_multiplier=None,
        seed=1,
    )
    torch.set_num_threads(threads)
    return PatientScorer(heart, result.weights, matrix.preprocessor, VERSION)


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict[str, Any]]]:
    return cleveland_records()


@pytest.fixture
def fhir(records: dict[str, list[dict[str, Any]]]) -> Fhir:
    return Fhir(records)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog.open(tmp_path / "audit.sqlite", None, owner="hub/test") as log:
        yield log


@pytest.fixture
def client(scorer: PatientScorer, audit: AuditLog, fhir: Fhir) -> TestClient:
    return make_client(scorer, audit, fhir)


@pytest.fixture(scope="module")
def es384() -> Signer:
    return Signer("ES384")


@pytest.fixture(scope="module")
def rs384() -> Signer:
    return Signer("RS384", kid="k2")
