"""The hub's dashboard: its data (`GET /v1/dashboard`, for the admin, scientists and auditors)
and its page (`GET /dashboard`, public and holding no data).

The API tests run the hub in-process over a small consortium (`tests.dashboard_support`); the
browser tests (`test_dashboard_browser.py`) serve the same consortium from a real uvicorn server
to Debian's headless Chromium.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from aipipe.hub.app import create_app
from aipipe.hub.roles import route_roles
from aipipe.hub.routes import ROUTERS
from tests.audit_support import _tamper
from tests.dashboard_support import EPSILON, PLAIN, SECURE, XSS, Consortium, build_consortium
from tests.hub_support import running_hub
from tests.live_server import serving


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    with running_hub(tmp_path_factory.mktemp("dashboard") / "hub") as hub:
        yield build_consortium(hub)


@pytest.fixture(scope="module")
def board(consortium: Consortium) -> dict[str, Any]:
    response = consortium.hub.client.get("/v1/dashboard", headers=consortium.hub.admin)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    data: dict[str, Any] = response.json()
    return data


def study_of(board: dict[str, Any], name: str) -> dict[str, Any]:
    (study,) = [s for s in board["studies"] if s["name"] == name]
    return study


NONE = dict.fromkeys(("epsilon", "accuracy", "auc", "local_accuracy", "local_auc"))


# -- who may read it ----------------------------------------------------------------------------


def test_the_dashboard_data_is_for_the_admin_scientists_and_auditors_only() -> None:
    (row,) = [r for r in route_roles(ROUTERS) if r.path == "/v1/dashboard"]
    assert row.roles == {"admin", "scientist", "auditor"}


def test_a_node_credential_is_refused_with_a_403_that_says_why(consortium: Consortium) -> None:
    response = consortium.hub.client.get("/v1/dashboard", headers=consortium.alpha.headers)
    assert response.status_code == 403, response.text
    assert "needs the role admin or auditor or scientist" in response.json()["detail"]


def test_no_token_is_a_401(consortium: Consortium) -> None:
    assert consortium.hub.client.get("/v1/dashboard").status_code == 401


# -- what it shows ------------------------------------------------------------------------------


def test_nodes_show_their_state_and_last_seen(board: dict[str, Any]) -> None:
    nodes = {n["name"]: n for n in board["nodes"]}
    assert set(nodes) == {"alpha", "bravo", "charlie", XSS}
    assert nodes["alpha"]["state"] == "active" and nodes["alpha"]["last_seen"]
    assert nodes[XSS]["state"] == "revoked" and nodes[XSS]["last_seen"] is None
    assert all(n["reputation"] is None for n in nodes.values())  # no study screens them


def test_rounds_show_their_state_participants_and_declines(board: dict[str, Any]) -> None:
    rounds = study_of(board, PLAIN["name"])["rounds"]
    assert [(r["round"], r["state"]) for r in rounds] == [(1, "closed"), (2, "closed"), (3, "open")]
    assert rounds[0]["participants"] == ["alpha", "bravo"] and rounds[0]["selected"] == 3
    assert rounds[0]["declined"] == {"charlie": "site budget spent"}
    assert rounds[0]["closed_at"] and rounds[2]["closed_at"] is None
    assert rounds[2]["declined"] == {"alpha": XSS}  # charlie was excluded after round 1


def test_each_site_s_stated_epsilon_is_shown_per_round_against_the_study_s(
    board: dict[str, Any],
) -> None:
    study = study_of(board, PLAIN["name"])
    assert study["epsilon_target"] == 2.0 and study["epsilon_disclosed"] is True
    assert study["epsilon_by_site"] == {site: spent[-1] for site, spent in EPSILON.items()}
    for index, number in enumerate((1, 2)):
        sites = {s["node"]: s for s in study["rounds"][number - 1]["sites"]}
        assert {n: sites[n]["epsilon"] for n in EPSILON} == {
            n: spent[index] for n, spent in EPSILON.items()
        }
    assert study["rounds"][0]["sites"][2] == {"node": "charlie", "status": "declined", **NONE}


def test_a_secure_study_discloses_no_epsilon(board: dict[str, Any]) -> None:
    study = study_of(board, SECURE["name"])
    assert study["secure"] == "secagg" and study["epsilon_disclosed"] is False
    assert study["epsilon_by_site"] == {} and study["epsilon_target"] == 1.0


def test_accuracy_and_the_pooled_auc_are_what_was_reported(
    consortium: Consortium, board: dict[str, Any]
) -> None:
    rounds = study_of(board, PLAIN["name"])["rounds"]
    for number, version in enumerate(consortium.versions, start=1):
        model = consortium.hub.client.get(f"/v1/models/{version}", headers=consortium.hub.admin)
        assert rounds[number - 1]["pooled_auc"] == model.json()["validation"]["auc"]
        sites = {s["node"]: s for s in rounds[number - 1]["sites"]}
        assert sites["alpha"]["accuracy"] == model.json()["metrics"]["alpha"]["accuracy"]
        assert sites["bravo"]["accuracy"] is None  # it reported none
    assert 0.5 < rounds[0]["pooled_auc"] <= 1.0
    assert rounds[2]["pooled_auc"] is None


def test_model_versions_show_their_lineage(consortium: Consortium, board: dict[str, Any]) -> None:
    versions = {v["version"]: v for v in board["versions"] if v["study"] == PLAIN["name"]}
    first, second = (versions[v] for v in consortium.versions)
    (initial,) = [v for v in versions.values() if v["round"] == 0]
    assert (first["parent"], first["round"], first["contributors"]) == (initial["version"], 1, 2)
    assert (second["parent"], second["round"], second["current"]) == (first["version"], 2, True)
    assert not first["current"] and (initial["aggregator"], first["aggregator"]) == (
        "init",
        "fedavg",
    )
    model = consortium.hub.client.get(
        f"/v1/models/{second['version']}", headers=consortium.hub.admin
    )
    assert model.json()["parent"] == first["version"]
    assert len(second["sha256"]) == 64


def test_the_audit_chain_is_verified_up_to_its_last_event(board: dict[str, Any]) -> None:
    audit = board["audit"]
    assert audit["verified"] is True and audit["broken_at"] is None
    assert audit["events"] > 10 and audit["checkpoints"] >= 1
    assert audit["last_checkpoint_seq"] == audit["events"] - audit["unanchored"]


def test_a_tampered_audit_chain_shows_where_it_breaks(tmp_path: Path) -> None:
    with running_hub(tmp_path / "hub") as hub:
        hub.enrol("alpha")
        hub.publish()
        _tamper(hub.paths.audit_log, ("UPDATE events SET actor = 'mallory' WHERE seq = 3", ()))
        audit = hub.client.get("/v1/dashboard", headers=hub.admin).json()["audit"]
    assert audit["verified"] is False and audit["broken_at"] == 3 and audit["events"] == 2
    assert "event 3 was edited" in audit["problem"]


# -- the page -----------------------------------------------------------------------------------


def test_the_page_is_public_holds_no_data_and_sets_security_headers(
    consortium: Consortium,
) -> None:
    response = consortium.hub.client.get("/dashboard")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    assert "alpha" not in response.text and "chd-plain" not in response.text
    urls = set(re.findall(r"https?://[^\s\"']*", response.text))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace: nothing is loaded
    assert not re.search(r"<(link|iframe|object|embed)|\ssrc=", response.text)


# -- the page in a real headless Chromium ---------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TITLE = "aipipe hub dashboard"


@dataclass(frozen=True)
class LiveHub:
    url: str
    admin_token: str
    node_token: str
    versions: list[str]
    audit_events: Callable[[], int]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveHub]:
    """The consortium, built in-process, then served by a real uvicorn server on 127.0.0.1."""
    home = tmp_path_factory.mktemp("dashboard-live") / "hub"
    with running_hub(home) as hub:
        built = build_consortium(hub)
    with serving(create_app(hub.paths)) as port:
        url = f"http://127.0.0.1:{port}"

        def audit_events() -> int:
            answer = httpx.get(f"{url}/v1/dashboard", headers=hub.admin, timeout=30)
            return int(answer.json()["audit"]["events"])

        yield LiveHub(url, hub.admin_token, built.alpha.credential, built.versions, audit_events)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, driven through its chromium-driver (never downloaded)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports land there
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,2000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the browser tests leave their screenshots: $AIPIPE_SCREENSHOTS, else tmp_path."""
    folder = Path(os.environ.get("AIPIPE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_in(driver: Any, live: LiveHub, token: str) -> None:
    """A fresh tab state: open the page, type the token, show."""
    driver.get(f"{live.url}/dashboard")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{live.url}/dashboard")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "show").click()


def loaded(driver: Any, live: LiveHub) -> None:
    sign_in(driver, live, live.admin_token)
    WebDriverWait(driver, 15).until(
        lambda d: d.find_element(By.ID, "content").get_attribute("data-loaded")
    )


def rows(driver: Any, selector: str) -> list[list[str]]:
    """The text of each body row of the table at `selector`, cell by cell."""
    table = driver.find_element(By.CSS_SELECTOR, selector)
    found = table.find_elements(By.TAG_NAME, "tr")[1:]
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in found]


@pytest.mark.e2e
def test_the_page_shows_the_consortium_in_a_real_browser(
    browser: Any, live: LiveHub, screenshots: Path
) -> None:
    loaded(browser, live)
    browser.save_screenshot(str(screenshots / "dashboard.png"))
    assert (screenshots / "dashboard.png").stat().st_size > 10_000
    nodes = {r[0]: r for r in rows(browser, "#nodes")}
    assert nodes["alpha"][1] == "active" and nodes["alpha"][2] != "never"
    assert nodes["alpha"][4] == "not screened"
    plain = f"[data-study='{PLAIN['name']}']"
    assert [r[:5] for r in rows(browser, f"{plain} table.rounds")] == [
        ["1", "closed", "alpha, bravo", "3", "charlie: site budget spent"],
        ["2", "closed", "alpha, bravo", "2", "—"],
        ["3", "open", "none", "2", f"alpha: {XSS}"],
    ]
    assert rows(browser, f"{plain} table.epsilon") == [
        ["alpha", "1.000", "2.00", "50 %"],
        ["bravo", "1.300", "2.00", "65 %"],
    ]
    sites = {(r[0], r[1]): r for r in rows(browser, f"{plain} table.sites")}
    assert sites["1", "alpha"][2:5] == ["reported", "0.500", "0.700"]
    assert sites["2", "bravo"][2:5] == ["reported", "1.300", "—"]
    masked = f"[data-study='{SECURE['name']}']"
    assert rows(browser, f"{masked} table.epsilon") == [
        ["every site", "not disclosed", "1.00", "—"]
    ]
    versions = {r[0]: r for r in rows(browser, "#versions")}
    first, second = (v[:12] for v in live.versions)
    assert versions[second][1:5] == [PLAIN["name"], "2", first, "2"] and versions[second][8] == "✓"
    assert browser.find_element(By.ID, "audit").text.startswith(
        f"verified up to event {live.audit_events()} — last signed checkpoint at event"
    )
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []  # no CSP refusal


@pytest.mark.e2e
def test_the_charts_draw_each_reported_series(browser: Any, live: LiveHub) -> None:
    loaded(browser, live)
    plain = f"[data-study='{PLAIN['name']}']"

    def series(chart: str) -> list[str]:
        lines = browser.find_elements(By.CSS_SELECTOR, f"{plain} [data-chart={chart}] polyline")
        return [line.get_attribute("data-series") for line in lines]

    assert series("metrics") == ["pooled AUC", "alpha accuracy"]
    assert series("epsilon") == ["alpha", "bravo"]
    assert browser.find_elements(By.CSS_SELECTOR, f"{plain} [data-chart=epsilon] line.target")
    masked = browser.find_element(By.CSS_SELECTOR, f"[data-study='{SECURE['name']}']").text
    assert "ε per site: not disclosed (secure aggregation)" in masked


@pytest.mark.e2e
def test_html_from_the_store_renders_as_text(browser: Any, live: LiveHub) -> None:
    loaded(browser, live)
    assert XSS in [r[0] for r in rows(browser, "#nodes")]
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.title == TITLE  # the onerror never ran


@pytest.mark.e2e
def test_the_token_stays_in_the_tab_s_session_storage_only(browser: Any, live: LiveHub) -> None:
    loaded(browser, live)
    kept = browser.execute_script("return [sessionStorage.length, localStorage.length]")
    assert kept == [1, 0] and not browser.find_element(By.ID, "login").is_displayed()
    browser.find_element(By.ID, "forget").click()
    assert browser.execute_script("return sessionStorage.length") == 0
    assert not browser.find_element(By.ID, "content").is_displayed()
    assert browser.find_element(By.ID, "login").is_displayed()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("who", "shown"),
    [
        ("node", "403: node 'alpha' may not GET /v1/dashboard: it needs the role admin or auditor"),
        ("wrong", "401: unknown or revoked token"),
    ],
)
def test_a_refused_token_shows_the_hub_s_answer(
    browser: Any, live: LiveHub, screenshots: Path, who: str, shown: str
) -> None:
    sign_in(browser, live, live.node_token if who == "node" else "not-a-token")
    message = WebDriverWait(browser, 15).until(
        lambda d: d.find_element(By.ID, "message").text or None
    )
    browser.save_screenshot(str(screenshots / f"dashboard-refused-{who}.png"))
    assert message.startswith(shown)
    assert not browser.find_element(By.ID, "content").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
