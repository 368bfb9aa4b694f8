"""`make demo`: a federated study across the 4 UCI heart-disease hospitals, on loopback.

One hub process and four node processes (Cleveland, Hungary, Switzerland, Long Beach VA), each
node holding only its own hospital's FHIR data. Every site trains with DP-SGD within ε = 1 and
sends its update masked with SecAgg+ (`--secure secagg`, the default) or encrypted with CKKS
(`--secure ckks`): the hub learns only the sum of the updates, and versions every model. At the
end: a per-round table, each
site's test accuracy/AUC for the federated model beside the same site training alone under the
same privacy terms and, with `--personalize METHOD`, the site's personal model (kept on its
node), ε spent per site, the final model version, and a verified audit export.

The solo baseline is benchmark-only: it runs on the public UCI data outside the sites' ledgers
(a real node charges it to its site ledger: `train_alone(..., ledger=...)`), and so were the
shipped study's hyper-parameters tuned; a real deployment tunes on its own budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

from aipipe.study.personal import METHODS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "heart-disease"
SITES = ("cleveland", "hungarian", "switzerland", "va")
console = Console(width=max(100, Console().width))


def aipipe(*args: str) -> str:
    """Run one CLI command; secrets travel in the environment, never on the command line."""
    command = [sys.executable, "-m", "aipipe", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"aipipe {args[0]} {args[1]} failed:\n{result.stderr}")
    return result.stdout


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "aipipe", *args], stdout=handle, stderr=subprocess.STDOUT
    )


def wait_for_hub(home: Path, timeout_s: float = 60.0) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        serve = home / "serve.json"
        if serve.exists():
            url = str(json.loads(serve.read_text())["url"])
            trust = ssl.create_default_context(cafile=str(home / "ca-cert.pem"))  # `hub init`'s CA
            try:
                if httpx.get(f"{url}/healthz", timeout=2, verify=trust).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    sys.exit("the hub did not become ready; see its log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=ROOT / "demo-run")
    parser.add_argument("--rounds", type=int, default=None, help="default: the study's rounds")
    parser.add_argument(
        "--secure",
        choices=("secagg", "ckks", "none"),
        default="secagg",
        help="how updates reach the hub: SecAgg+ masks (default), CKKS ciphertexts, or in clear",
    )
    parser.add_argument(
        "--personalize",
        choices=METHODS,
        default="ditto",
        help="the study's personalization method: each site also keeps a model of its own "
        "(README, 'Personalization'); default ditto, the best at ε = 1 on the shipped "
        "logistic study in bench/personalization.py; none: the global model only",
    )
    args = parser.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        run(work, args.rounds, args.secure, args.personalize, processes)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    console.print(f"\ndemo finished in {time.monotonic() - started:.0f} s; files in {work}")


def secure_study(work: Path, mode: str, personalize: str = "none") -> Path:
    """The shipped study with `secure: <mode>` (and a `personalization:` block when a method is
    named): the only changes the consortium makes."""
    raw = yaml.safe_load((DATA / "study.yaml").read_text())
    raw["secure"] = mode
    if personalize != "none":
        raw["personalization"] = {"method": personalize}
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(
    work: Path,
    rounds: int | None,
    secure: str,
    personalize: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    hub_home = work / "hub"
    study_file = secure_study(work, secure, personalize)
    console.rule("1. hub")
    token = json.loads(aipipe("hub", "init", "--home", str(hub_home), "--name", "heart", "--json"))[
        "admin_token"
    ]
    processes.append(
        start("hub", "serve", "--home", str(hub_home), "--port", "0", log=work / "hub.log")
    )
    url = wait_for_hub(hub_home)
    console.print(f"hub serving at {url}")
    os.environ["AIPIPE_HUB_URL"] = url
    os.environ["AIPIPE_TOKEN"] = token  # read by the CLI; kept off command lines and logs
    os.environ["AIPIPE_HUB_CA"] = str(hub_home / "ca-cert.pem")  # nodes get it in their token
    console.rule("2. nodes: enrol and ingest their own FHIR data")
    for site in SITES:
        enrol = json.loads(
            aipipe("hub", "enrol-token", "--home", str(hub_home), "--node", site, "--json")
        )["token"]
        home = str(work / site)
        os.environ["AIPIPE_ENROL_TOKEN"] = enrol
        aipipe("node", "init", "--home", home, "--name", site, "--json")
        del os.environ["AIPIPE_ENROL_TOKEN"]
        ingested = json.loads(
            aipipe("node", "ingest", "--home", home, str(DATA / "fhir" / site), "--json")
        )
        totals = ingested["totals"]
        console.print(
            f"{site:12} stored {totals['stored']:5} resources, rejected {totals['rejected']}"
        )
    console.rule("3. study: publish, then each site approves it")
    study = json.loads(aipipe("study", "publish", str(study_file), "--json"))
    name = study["name"]
    for site in SITES:
        approval = json.loads(aipipe("node", "approve", name, "--home", str(work / site), "--json"))
        features = json.loads(
            aipipe("study", "features", str(study_file), "--home", str(work / site), "--json")
        )
        console.print(
            f"{site:12} approved {approval['digest'][:12]}  cohort {features['cohort']}"
            f"  train/test {features['train']}/{features['test']}"
            f"  prevalence {features['prevalence']:.2f}"
        )
    for site in SITES:
        processes.append(
            start(
                "node", "start", "--home", str(work / site), "--poll", "5", log=work / f"{site}.log"
            )
        )
    how = {"secagg": "SecAgg+ masked", "ckks": "CKKS encrypted", "none": "in clear"}[secure]
    console.rule(f"4. federated training (DP-SGD at every site, updates {how})")
    n_rounds = rounds or int(study["spec"]["training"]["rounds"])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "aipipe",
            "train",
            "run",
            "--study",
            name,
            "--rounds",
            str(n_rounds),
        ],
        check=True,
    )
    if personalize != "none":
        _await_personal(work, name)
    report(work, name)


def report(work: Path, study: str) -> None:
    from aipipe.node.baseline import train_alone  # torch imports only once they are needed
    from aipipe.node.home import open_node, open_store
    from aipipe.node.lineage import ModelLineage
    from aipipe.study.features import extract
    from aipipe.study.spec import load_study

    spec = load_study(DATA / "study.yaml")

    models = json.loads(aipipe("model", "list", "--study", study, "--json"))
    final = models[-1]
    console.print()
    console.rule("5. results")
    table = Table(
        title=f"test split per site (read from each node's home; the hub gets no metrics): "
        f"federated model {final['version'][:12]} (global) beside the site training alone "
        "(solo) under the same ε and the site's personal model (personalized: the one with the "
        "lowest validation loss; kept on the node); solo is benchmark-only: public data, not "
        "charged",
        title_justify="left",
    )
    columns = (
        "site",
        "n",
        "global acc",
        "global AUC",
        "solo acc",
        "solo AUC",
        "personal acc",
        "personal AUC",
        "ε spent",
        "share",
        "site ε",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "site" else "right")
    for site in SITES:
        # Each node keeps its evaluation at home (no metric reaches the hub: it would leak
        # labels); the demo runs every node on this machine, so it reads them from the homes.
        store = open_store(open_node(work / site))
        try:
            mine = ModelLineage(store.db).evaluation(study, final["version"])
            metrics = {} if mine is None else mine.__dict__
            # Public benchmark data only: on a real node, pass ledger=BudgetLedger(store.db).
            alone = train_alone(extract(store, spec), spec, benchmark_only=True, seed=0)
        finally:
            store.close()
        budget = json.loads(aipipe("privacy", "status", "--home", str(work / site), "--json"))
        spent: dict[str, Any] = next((b for b in budget["studies"] if b["study"] == study), {})
        personal = _served_personal(work / site, study)
        site_spent = (budget["site"] or {}).get("spent")
        table.add_row(
            site,
            str(metrics.get("n", "–")),
            _fmt(metrics.get("accuracy")),
            _fmt(metrics.get("auc")),
            _fmt(alone.accuracy),
            _fmt(alone.auc),
            _fmt(personal.get("personal_test_accuracy")),
            _fmt(personal.get("personal_test_auc")),
            _fmt(spent.get("spent")),
            _fmt(spent.get("epsilon_budget")),
            _fmt(site_spent),
        )
    console.print(table)
    export = work / "hub-audit.fhir.json"
    aipipe("audit", "export", "--home", str(work / "hub"), "--format", "fhir", "--out", str(export))
    verified = json.loads(aipipe("audit", "verify", "--home", str(work / "hub"), "--json"))
    console.print(
        f"model version {final['version']} (round {final['round']}, "
        f"{len(final['contributors'])} contributing sites)"
    )
    console.print(
        f"hub audit trail: {verified['events']} events, chain verified; "
        f"FHIR AuditEvent export at {export}"
    )


def _await_personal(work: Path, study: str, timeout_s: float = 60.0) -> None:
    """Each node makes its personal model of the last version once the hub has no more work for
    it (about a second after the last round, `aipipe.node.personal_pending`): wait for it."""
    final = json.loads(aipipe("model", "list", "--study", study, "--json"))[-1]["version"]
    deadline = time.monotonic() + timeout_s
    for site in SITES:
        home = str(work / site)
        while time.monotonic() < deadline:
            listed = json.loads(aipipe("node", "personal", "--home", home, "--study", study,
                                       "--json"))  # fmt: skip
            if any(m["version"] == final for m in listed["models"]):
                break
            time.sleep(0.5)


def _served_personal(home: Path, study: str) -> dict[str, Any]:
    """The site's served personal model as `aipipe node personal` lists it ({} without one)."""
    listed = json.loads(aipipe("node", "personal", "--home", str(home), "--study", study, "--json"))
    return next((m for m in listed["models"] if m["served"]), {})


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "–"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
