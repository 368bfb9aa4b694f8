"""FhirServerSource against scripted servers (MockTransport): paging, cursors, retries, refusals."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from aipipe.errors import ConfigError, FhirServerError
from aipipe.fhir.server import MAX_RETRY_AFTER_S, FhirServerSource

BASE = "https://ehr.example.org/fhir"
Handler = Callable[[httpx.Request], httpx.Response]


def patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{n}", "meta": {"versionId": "1"}}


def searchset(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Patient"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}


def outcome(diagnostics: str) -> dict[str, Any]:
    issue = {"severity": "error", "code": "invalid", "diagnostics": diagnostics}
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class Server:
    """Answers requests in order from a script and records what was asked."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_source(handler: Handler, **knobs: Any) -> tuple[FhirServerSource, list[float]]:
    sleeps: list[float] = []
    knobs = {"base_url": BASE, "backoff_s": 0.5, "max_retries": 3, **knobs}
    source = FhirServerSource(transport=httpx.MockTransport(handler), sleep=sleeps.append, **knobs)
    return source, sleeps


def test_pages_are_followed_until_there_is_no_next_link() -> None:
    first_page = searchset([patient(1), patient(2)], f"{BASE}/Patient?page=2")
    first_page["total"] = 5
    server = Server(
        httpx.Response(200, json=first_page),
        httpx.Response(200, json=searchset([patient(3), patient(4)], f"{BASE}/Patient?page=3")),
        httpx.Response(200, json=searchset([patient(5)])),
    )
    source, _ = make_source(server, page_size=2)

    ids = [r["id"] for r in source.iter_resources("Patient")]

    assert ids == ["p1", "p2", "p3", "p4", "p5"]
    assert [str(r.url) for r in server.requests[1:]] == [
        f"{BASE}/Patient?page=2",
        f"{BASE}/Patient?page=3",
    ]
    assert source.last_pull is not None
    assert (source.last_pull.total, source.last_pull.pages, source.last_pull.resources) == (5, 3, 5)


def test_first_search_asks_for_the_page_size_sorted_by_last_updated() -> None:
    server = Server(httpx.Response(200, json=searchset([])))
    source, _ = make_source(server, page_size=7)

    list(source.iter_resources("Observation"))

    request = server.requests[0]
    assert request.url.path == "/fhir/Observation"
    assert dict(request.url.params) == {"_count": "7", "_sort": "_lastUpdated"}
    assert request.headers["accept"] == "application/fhir+json"


def test_since_is_sent_as_a_last_updated_greater_than_filter() -> None:
    server = Server(httpx.Response(200, json=searchset([])))
    source, _ = make_source(server)

    list(source.iter_resources("Observation", since="2024-05-01T10:00:00.123+02:00"))

    assert server.requests[0].url.params["_lastUpdated"] == "gt2024-05-01T10:00:00.123+02:00"


def test_sorting_can_be_turned_off_for_servers_that_reject_it() -> None:
    server = Server(httpx.Response(200, json=searchset([])))
    source, _ = make_source(server, sort_by_last_updated=False)

    list(source.iter_resources("Patient"))

    assert "_sort" not in server.requests[0].url.params


def test_outcome_entries_are_skipped_and_counted() -> None:
    bundle = searchset([patient(1)])
    bundle["entry"].append({"resource": outcome("_foo ignored"), "search": {"mode": "outcome"}})
    source, _ = make_source(Server(httpx.Response(200, json=bundle)))

    resources = list(source.iter_resources("Patient"))

    assert [r["resourceType"] for r in resources] == ["Patient"]
    assert source.last_pull is not None
    assert source.last_pull.outcomes == 1


def test_429_and_503_are_retried_with_backoff_and_retry_after_then_succeed() -> None:
    server = Server(
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(503),
        httpx.Response(200, json=searchset([patient(1)])),
    )
    source, sleeps = make_source(server, backoff_s=0.5)

    ids = [r["id"] for r in source.iter_resources("Patient")]

    assert ids == ["p1"]
    assert sleeps == [3.0, 1.0]  # Retry-After, then 0.5 s doubled on the second attempt


def test_a_huge_retry_after_is_capped() -> None:
    server = Server(
        httpx.Response(503, headers={"Retry-After": "86400"}),
        httpx.Response(200, json=searchset([])),
    )
    source, sleeps = make_source(server)

    list(source.iter_resources("Patient"))

    assert sleeps == [MAX_RETRY_AFTER_S]


def test_connection_errors_are_retried() -> None:
    server = Server(
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.Response(200, json=searchset([patient(1)])),
    )
    source, sleeps = make_source(server)

    assert [r["id"] for r in source.iter_resources("Patient")] == ["p1"]
    assert sleeps == [0.5, 1.0]


def test_it_gives_up_after_max_retries() -> None:
    server = Server(*[httpx.Response(503) for _ in range(3)])
    source, sleeps = make_source(server, max_retries=2)

    with pytest.raises(FhirServerError, match=r"still answered 503 after 3 tries"):
        list(source.iter_resources("Patient"))

    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_a_server_that_is_not_running_is_reported_as_connection_refused() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/fhir"
    source = FhirServerSource(base_url=url, max_retries=1, backoff_s=0.0, timeout_s=5.0)

    with pytest.raises(FhirServerError) as caught:
        list(source.iter_resources("Patient"))

    assert str(caught.value) == (
        f"cannot reach FHIR server at {url}: connection refused after 2 tries; is it running?"
    )


def test_a_client_error_reports_status_and_diagnostics_without_retrying() -> None:
    server = Server(httpx.Response(400, json=outcome("Unknown search parameter '_sort'")))
    source, sleeps = make_source(server)

    with pytest.raises(FhirServerError) as caught:
        list(source.iter_resources("Patient"))

    message = str(caught.value)
    assert "answered 400 to GET /fhir/Patient" in message
    assert "Unknown search parameter '_sort'" in message
    assert (len(server.requests), sleeps) == (1, [])


def test_an_unauthorised_pull_says_to_check_credentials() -> None:
    source, _ = make_source(Server(httpx.Response(401, json=outcome("Authentication required"))))

    with pytest.raises(FhirServerError, match=r"401.*Authentication required.*credentials"):
        list(source.iter_resources("Patient"))


def test_error_messages_never_carry_resource_contents() -> None:
    body = {"resourceType": "Patient", "name": [{"family": "Doe"}]}  # a misbehaving server
    source, _ = make_source(Server(httpx.Response(404, json=body)))

    with pytest.raises(FhirServerError) as caught:
        list(source.iter_resources("Patient"))

    assert "Doe" not in str(caught.value)


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example.org/fhir/Patient?page=2",  # another host
        "http://ehr.example.org/fhir/Patient?page=2",  # downgraded to plain http
        "https://ehr.example.org:8443/fhir/Patient?page=2",  # another port
        "https://ehr.example.org/other/Patient?page=2",  # outside the base path
        "https://ehr.example.org/fhir2/Patient?page=2",  # a sibling path sharing a prefix
    ],
)
def test_a_next_link_off_the_server_is_refused(next_url: str) -> None:
    server = Server(httpx.Response(200, json=searchset([patient(1)], next_url)))
    source, _ = make_source(server)

    with pytest.raises(FhirServerError, match="refusing to follow it"):
        list(source.iter_resources("Patient"))

    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "next_url",
    ["/fhir/Patient?page=2", "https://EHR.example.org:443/fhir?_getpages=abc"],
)
def test_relative_and_equivalent_next_links_are_followed(next_url: str) -> None:
    server = Server(
        httpx.Response(200, json=searchset([patient(1)], next_url)),
        httpx.Response(200, json=searchset([patient(2)])),
    )
    source, _ = make_source(server)

    assert [r["id"] for r in source.iter_resources("Patient")] == ["p1", "p2"]


def test_a_paging_loop_is_stopped() -> None:
    loop = f"{BASE}/Patient?page=2"
    server = Server(
        httpx.Response(200, json=searchset([patient(1)], loop)),
        httpx.Response(200, json=searchset([patient(2)], loop)),
    )
    source, _ = make_source(server)

    with pytest.raises(FhirServerError, match="same next-page link twice"):
        list(source.iter_resources("Patient"))


def capability(version: str) -> dict[str, Any]:
    return {"resourceType": "CapabilityStatement", "fhirVersion": version, "rest": []}


def test_capabilities_of_an_r4_server_are_returned() -> None:
    server = Server(httpx.Response(200, json=capability("4.0.1")))
    source, _ = make_source(server)

    assert source.capabilities()["fhirVersion"] == "4.0.1"
    assert server.requests[0].url.path == "/fhir/metadata"


@pytest.mark.parametrize("version", ["3.0.2", "4.3.0", "5.0.0"])
def test_capabilities_of_a_server_that_is_not_r4_are_refused(version: str) -> None:
    source, _ = make_source(Server(httpx.Response(200, json=capability(version))))

    with pytest.raises(FhirServerError, match=rf"reports FHIR version {version}, aipipe needs R4"):
        source.capabilities()


@pytest.mark.parametrize(
    "knobs",
    [
        {"base_url": "ftp://ehr.example.org/fhir"},
        {"base_url": "ehr.example.org/fhir"},
        {"page_size": 0},
        {"page_size": 5000},
        {"max_retries": -1},
        {"backoff_s": -0.1},
        {"timeout_s": 0},
    ],
)
def test_bad_knobs_are_refused_on_entry(knobs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FhirServerSource(**{"base_url": BASE, **knobs})


@pytest.mark.parametrize(
    ("resource_type", "since"),
    [("Patient/../x", None), ("Patient", "yesterday"), ("Patient", "2024-05-01T10:00")],
)
def test_bad_search_inputs_are_refused_before_any_request(
    resource_type: str, since: str | None
) -> None:
    server = Server()
    source, _ = make_source(server)

    with pytest.raises(ConfigError):
        list(source.iter_resources(resource_type, since))

    assert server.requests == []
