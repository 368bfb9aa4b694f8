"""One error table (issue 12, item 4): every `AipipeError` declares its HTTP status and exit code
once; the hub answers `{"error": <class name>, "detail": ...}` with that status, the node's
`HubClient` rebuilds the same class from the name (never from the URL), the CLI exits with the
class's code; wire decode errors are `AipipeError`s; `aipipe.wire` imports nothing above it;
one clock module.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import aipipe
import aipipe.aggregation.base
import aipipe.fhir.smart
import aipipe.models.errors
import aipipe.node.round_state
import aipipe.privacy.errors
import aipipe.secure.errors
import aipipe.wire.frames
import aipipe.wire.tensors
from aipipe.cli.render import AipipeGroup
from aipipe.errors import (
    AipipeError,
    AuditChainBrokenError,
    AuthError,
    BlobIntegrityError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    StudyError,
    ThrottledError,
    UpdateRejectedError,
)
from aipipe.hub.app import create_app
from aipipe.hub.home import init_hub
from aipipe.node.client import HubClient
from aipipe.privacy.errors import BudgetExhaustedError, BudgetNotSetError, UnknownAccountantError
from aipipe.wire.frames import FrameError, unpack_frame
from aipipe.wire.tensors import TensorDecodeError, decode_arrays

PACKAGE = Path(aipipe.__file__).parent


def _subclasses(cls: type[AipipeError]) -> Iterator[type[AipipeError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


ERRORS = sorted(
    {c for c in _subclasses(AipipeError) if c.__module__.startswith("aipipe.")} | {AipipeError},
    key=lambda c: c.__name__,
)

# What the hub answered before the table (aipipe/hub/app.py `_error_status`): unchanged.
STATUS = {
    BlobIntegrityError: 500,
    ForbiddenError: 403,
    ThrottledError: 429,  # added with it (issue 15 follow-up)
    AuthError: 401,
    NotFoundError: 404,
    ConflictError: 409,
    UpdateRejectedError: 409,
    StudyError: 422,
}


def expected_status(cls: type[AipipeError]) -> int:
    return next((s for c, s in STATUS.items() if issubclass(cls, c)), 400)


def make(cls: type[AipipeError]) -> AipipeError:
    """An instance with a recognisable message, whatever the class's constructor takes."""
    if issubclass(cls, AuditChainBrokenError):
        return cls("boom: the chain breaks at 3", first_bad_seq=3)
    if issubclass(cls, BudgetNotSetError):
        return cls("boom-study")
    if issubclass(cls, BudgetExhaustedError):
        return cls(study="boom", round=2, needed=1.0, spent=0.5, budget=1.0)
    if issubclass(cls, UnknownAccountantError):
        return cls("boom", ["rdp", "prv"])
    return cls(f"boom: {cls.__name__} for a test")


def message_only(cls: type[AipipeError]) -> type[AipipeError]:
    """The nearest class (itself or an ancestor) built from a message alone."""
    while cls is not AipipeError and any(
        "__init__" in vars(k)
        for k in cls.__mro__
        if k is not AipipeError and issubclass(k, AipipeError)
    ):
        cls = next(b for b in cls.__bases__ if issubclass(b, AipipeError))
    return cls


@pytest.fixture(scope="module")
def raising_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    """The real hub app (its own exception handler) with one extra route that raises an error
    by name, at a path that looks like an update upload and at one that does not."""
    paths, token = init_hub(tmp_path_factory.mktemp("hub") / "hub", "test-hub")
    app = create_app(paths)
    by_name = {c.__name__: c for c in ERRORS}

    async def raise_it(name: str) -> None:
        raise make(by_name[name])

    app.add_api_route("/v1/test-raise/{name}", raise_it, methods=["GET"])
    app.add_api_route("/v1/studies/s/rounds/1/updates/{name}", raise_it, methods=["GET"])
    with TestClient(app) as client:
        yield client, token


def hub_client(hub: TestClient, token: str) -> HubClient:
    return HubClient("http://testserver", token=token, transport=hub._transport, max_retries=0)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_crosses_http_as_itself(
    raising_hub: tuple[TestClient, str], cls: type[AipipeError]
) -> None:
    hub, token = raising_hub
    sent = make(cls)
    response = hub.get(f"/v1/test-raise/{cls.__name__}")
    assert response.status_code == expected_status(cls)
    assert response.json() == {"error": cls.__name__, "detail": str(sent)}
    with hub_client(hub, token) as client, pytest.raises(AipipeError) as caught:
        client._request("GET", f"/v1/test-raise/{cls.__name__}")
    assert type(caught.value) is message_only(cls)
    assert str(sent) in str(caught.value)


def test_a_refusal_before_the_body_is_read_names_its_error_too(
    raising_hub: tuple[TestClient, str],
) -> None:
    hub, _ = raising_hub
    response = hub.post("/v1/studies", json={"spec": {}}, headers={"Authorization": "Bearer x"})
    assert response.status_code == 401
    assert response.json()["error"] == "AuthError"
    client = HubClient("http://testserver", token="x", transport=hub._transport)
    with client, pytest.raises(AuthError):
        client.publish({})


@pytest.mark.parametrize(
    ("cls", "path"),
    [
        (ConflictError, "/v1/studies/s/rounds/1/updates/ConflictError"),
        (NotFoundError, "/v1/studies/s/rounds/1/updates/NotFoundError"),
        (UpdateRejectedError, "/v1/test-raise/UpdateRejectedError"),
    ],
)
def test_the_client_picks_the_error_by_name_not_by_url(
    raising_hub: tuple[TestClient, str], cls: type[AipipeError], path: str
) -> None:
    hub, token = raising_hub
    with hub_client(hub, token) as client, pytest.raises(AipipeError) as caught:
        client._request("GET", path)
    assert type(caught.value) is cls


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"detail": "no such study"}, NotFoundError),  # an older hub: no name
        (403, {"detail": "not yours"}, ForbiddenError),
        (409, {"detail": "round closed"}, ConflictError),
        (422, {"detail": "bad study"}, StudyError),
        (404, {"error": "ErrorFromAFutureHub", "detail": "x"}, NotFoundError),
        (400, {"error": "ValueError", "detail": "not an AipipeError: never built"}, AipipeError),
        (418, {"detail": "teapot"}, AipipeError),
    ],
)
def test_unknown_names_and_older_hubs_fall_back_on_the_status(
    status: int, body: dict[str, str], expected: type[AipipeError]
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=body))
    with HubClient("http://hub", transport=transport) as client, pytest.raises(AipipeError) as e:
        client.study("s")
    assert type(e.value) is expected
    assert body["detail"] in str(e.value)


def test_error_names_are_unique_and_every_error_has_a_status_and_an_exit_code() -> None:
    names = [c.__name__ for c in ERRORS]
    assert len(names) == len(set(names))
    for cls in ERRORS:
        assert 400 <= cls.http_status <= 599, cls
        assert cls.exit_code >= 1, cls


def test_wire_decode_errors_are_aipipe_errors() -> None:
    assert issubclass(FrameError, AipipeError)
    assert issubclass(TensorDecodeError, AipipeError)
    with pytest.raises(AipipeError):
        unpack_frame(b"not a frame")
    with pytest.raises(AipipeError):
        decode_arrays(b"not safetensors")


def test_the_cli_shows_a_wire_decode_error_as_one_line_without_a_traceback() -> None:
    app = typer.Typer(cls=AipipeGroup)

    @app.command()
    def weights() -> None:
        decode_arrays(b"what a hub with a damaged model might send")

    @app.command()
    def other() -> None:  # a group needs two commands to take subcommand names
        pass

    result = CliRunner().invoke(app, ["weights"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == TensorDecodeError.exit_code
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not a safetensors blob"), result.stderr


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_the_wire_layer_imports_nothing_above_it() -> None:
    allowed = ("aipipe.wire", "aipipe.errors", "aipipe.clock")
    upward = [
        f"{path.name}: {name}"
        for path in sorted((PACKAGE / "wire").glob("*.py"))
        for name in _imports(path)
        if name.startswith("aipipe") and not name.startswith(allowed)
    ]
    assert upward == []


CLOCK_PENDING: set[str] = set()
UTC_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _one_liner(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A helper: one statement after an optional docstring."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    return len(body) == 1


def test_one_clock_module() -> None:
    helpers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        if name == "clock.py" or name in CLOCK_PENDING:
            continue
        for node in ast.walk(ast.parse(path.read_text(), name)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _one_liner(node):
                source = ast.unparse(node)
                if "datetime.now(" in source or UTC_FORMAT in source:
                    helpers.append(f"{name}:{node.name}")
        text = path.read_text()
        if UTC_FORMAT in text or '"+00:00"' in text:  # the instant format, spelled again
            helpers.append(name)
    assert helpers == [], "clock helpers outside aipipe/clock.py"
    clock = importlib.import_module("aipipe.clock")
    assert clock.iso(clock.now()).endswith("Z")
    assert inspect.getsource(clock).count("def ") <= 8
