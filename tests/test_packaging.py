"""Issue 15, packaging: the Dockerfile, deploy/compose.yaml and deploy/k8s/ checked offline.

* every Kubernetes manifest validates against the Kubernetes JSON schemas that the
  `kubernetes-validate` package ships (strict: unknown fields refused), for the oldest and the
  newest version we claim, and holds the properties docs/deployment.md promises;
* the compose file is checked structurally and every reference resolves (no Compose schema
  validator is at hand offline: the `docker` client here has no `compose` plugin, and the
  compose-spec JSON schema is not packaged by a maintained PyPI distribution);
* the Dockerfile is checked structurally (it cannot be built here: no Docker daemon);
* the init scripts the manifests run are run here, with `sh`, on real homes.

Each checker is shown rejecting a broken copy (written to tmp_path), so none is vacuous.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aipipe.hub.home import load_hub

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSIONS = ("1.30.0", "1.37.0")
UID = 10001
SECRETISH = re.compile(r"aipipe-admin\.|eyJ[A-Za-z0-9_-]{8,}|BEGIN [A-Z ]*PRIVATE KEY")


# -- Kubernetes ----------------------------------------------------------------------------------


def k8s_resources(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def validate_k8s(path: Path, version: str) -> None:
    """Raise unless every resource in `path` validates (strict) against `version`'s schemas."""
    resources = k8s_resources(path)
    assert resources, f"{path} holds no resource"
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def all_k8s() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for resource in k8s_resources(path):
            found[(resource["kind"], resource["metadata"]["name"])] = resource
    return found


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = all_k8s()[("Deployment", name)]["spec"]["template"]["spec"]
    return spec


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    validate_k8s(path, version)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenessprobe={}),
        lambda d: d["spec"].update(replicas="one"),
        lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser="aipipe"),
    ],
    ids=["unknown-field", "wrong-type", "user-name-not-uid"],
)
def test_the_validator_rejects_a_broken_manifest(tmp_path: Path, breakage: Any) -> None:
    resources = k8s_resources(K8S / "hub.yaml")
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    breakage(deployment)
    broken = tmp_path / "hub.yaml"
    broken.write_text(yaml.safe_dump_all(resources))

    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(broken, K8S_VERSIONS[0])
    cli = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(broken)]
    assert subprocess.run(cli, capture_output=True, check=False).returncode != 0


def test_an_unknown_kind_is_not_passed_silently(tmp_path: Path) -> None:
    broken = tmp_path / "typo.yaml"
    broken.write_text(yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deploymnet"}))

    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_k8s(broken, K8S_VERSIONS[0])


def test_the_hub_is_one_non_root_replica_with_probes_resources_a_pvc_and_a_service() -> None:
    resources = all_k8s()
    deployment = resources[("Deployment", "aipipe-hub")]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = pod_spec("aipipe-hub")
    [hub] = spec["containers"]
    assert hub["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert hub["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the store and audit log answer
    assert hub["args"][:2] == ["hub", "serve"] and "--insecure-http" not in hub["args"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["aipipe-hub-home"]
    assert ("PersistentVolumeClaim", "aipipe-hub-home") in resources
    service = resources[("Service", "aipipe-hub")]["spec"]
    assert (
        service["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [p["port"] for p in service["ports"]] == [8700]


@pytest.mark.parametrize("name", ["aipipe-hub", "aipipe-node-a"])
def test_pods_run_non_root_read_only_with_limits(name: str) -> None:
    spec = pod_spec(name)
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == UID
    assert context["fsGroupChangePolicy"] == "OnRootMismatch"  # keys stay 0600
    assert spec["automountServiceAccountToken"] is False
    for container in containers(spec):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {"requests", "limits"} <= container["resources"].keys(), container["name"]
        for env in container.get("env", []):
            assert "value" not in env or not SECRETISH.search(str(env["value"])), env


def test_the_node_has_its_own_pvc_and_takes_its_token_from_a_secret() -> None:
    resources = all_k8s()
    spec = pod_spec("aipipe-node-a")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v]  # fmt: skip
    assert claims == ["aipipe-node-a-home"]
    assert ("PersistentVolumeClaim", "aipipe-node-a-home") in resources
    [enrol] = spec["initContainers"]
    [token] = [e for e in enrol["env"] if e["name"] == "AIPIPE_ENROL_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == "aipipe-node-a-enrol"
    assert "--token" not in " ".join(enrol["command"] + enrol["args"])
    [node] = spec["containers"]
    assert "ports" not in node  # a node dials out; nothing listens
    assert ("Service", "aipipe-node-a") not in resources


# -- the init scripts the manifests run ----------------------------------------------------------


def run_script(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a manifest's shell script with its /var/lib/aipipe moved under tmp_path."""
    text = script.replace("/var/lib/aipipe", str(tmp_path / "volume"))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    environment = {**os.environ, "PATH": path, **env}
    (tmp_path / "volume").mkdir(exist_ok=True)
    return subprocess.run(["sh", "-c", text], capture_output=True, text=True, env=environment,
                          timeout=120, check=False)  # fmt: skip


def test_the_hub_init_container_makes_a_tls_home_once_and_keeps_the_token_off_the_log(
    tmp_path: Path,
) -> None:
    [init] = pod_spec("aipipe-hub")["initContainers"]
    first = run_script(init["args"][0], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "aipipe-admin." not in first.stdout + first.stderr
    token_file = tmp_path / "volume" / "admin-token.json"
    assert json.loads(token_file.read_text())["admin_token"].startswith("aipipe-admin.")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    config = load_hub(tmp_path / "volume" / "hub").config
    assert (config.tls_cert, config.tls_key) == (
        "/etc/aipipe/tls/tls.crt",
        "/etc/aipipe/tls/tls.key",
    )
    assert config.tls_ca == "/etc/aipipe/hub-ca/hub-ca.pem"  # the CA enrolment tokens pin
    mounted = {m["mountPath"] for m in pod_spec("aipipe-hub")["containers"][0]["volumeMounts"]}
    assert {"/etc/aipipe/tls", "/etc/aipipe/hub-ca"} <= mounted

    token_file.unlink()
    again = run_script(init["args"][0], tmp_path)
    assert again.returncode == 0 and not token_file.exists()  # an existing home is left alone


def test_the_compose_hub_init_sets_the_secrets_as_tls_files(tmp_path: Path) -> None:
    script = compose()["services"]["hub-init"]["command"][0].replace("$$", "$")
    result = run_script(script, tmp_path)
    assert result.returncode == 0, result.stderr
    config = load_hub(tmp_path / "volume" / "hub").config
    assert config.tls_cert == "/run/secrets/hub_tls_cert"
    assert config.tls_key == "/run/secrets/hub_tls_key"
    assert config.tls_ca == "/run/secrets/hub_ca"
    assert "hub_ca" in compose()["services"]["hub"]["secrets"]


def test_the_node_init_container_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    [enrol] = pod_spec("aipipe-node-a")["initContainers"]
    env = {k: v for k, v in os.environ.items() if k != "AIPIPE_ENROL_TOKEN"}
    text = enrol["args"][0].replace("/var/lib/aipipe", str(tmp_path / "volume"))
    result = subprocess.run(["sh", "-c", text], capture_output=True, text=True, env=env,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 1 and "aipipe-node-a-enrol" in result.stderr
    assert not (tmp_path / "volume" / "node").exists()


# -- compose -------------------------------------------------------------------------------------


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())  # resolves the <<: merge keys
    return data


def validate_compose(data: dict[str, Any]) -> None:
    """Raise ValueError unless `data` is a valid Compose file whose references all resolve."""
    declared = {kind: set(data.get(kind) or {}) for kind in ("volumes", "secrets", "networks")}
    services = data["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")) and source not in declared["volumes"]:
                raise ValueError(f"{name}: volume {source!r} is not declared")
        for kind in ("secrets", "networks"):
            for ref in service.get(kind, []):
                if ref not in declared[kind]:
                    raise ValueError(f"{name}: {kind} {ref!r} is not declared")
        for dep in service.get("depends_on", {}):
            if dep not in services:
                raise ValueError(f"{name}: depends_on {dep!r}, no such service")


def plain_secrets(data: dict[str, Any]) -> list[str]:
    """Services that carry a token or key in their command line or environment."""
    found = []
    for name, service in data["services"].items():
        for field in ("command", "entrypoint", "environment"):
            text = json.dumps(service.get(field) or "")
            if SECRETISH.search(text) or "--token" in text or "AIPIPE_ENROL_TOKEN=" in text:
                found.append(f"{name}.{field}")
    return found


def test_the_compose_file_is_valid_and_every_reference_resolves() -> None:
    validate_compose(compose())


def test_hub_and_two_nodes_each_on_its_own_volume_nodes_publish_nothing() -> None:
    services = compose()["services"]
    assert {"hub", "node-a", "node-b"} <= services.keys()
    homes = {name: services[name]["volumes"] for name in ("hub", "node-a", "node-b")}
    sources = [v.split(":")[0] for volumes in homes.values() for v in volumes]
    assert len(sources) == len(set(sources)) == 3, homes
    assert services["hub"]["ports"] == ["8700:8700"]
    for name in ("node-a", "node-b"):
        assert "ports" not in services[name]
        assert services[name]["depends_on"]["hub"]["condition"] == "service_healthy"
    for service in services.values():
        assert service["user"] == f"{UID}:{UID}" and service["read_only"] is True


def test_enrolment_tokens_come_from_env_files_never_the_command_line() -> None:
    data = compose()
    assert plain_secrets(data) == []
    for node in ("node-a", "node-b"):
        enrol = data["services"][f"{node}-enrol"]
        assert enrol["command"][:2] == ["node", "init"]
        assert [e["path"] for e in enrol["env_file"]] == [f"./secrets/{node}.env"]
        assert "setup" in enrol["profiles"]  # never started by `up`
    assert (ROOT / "deploy" / ".gitignore").read_text().split() == ["secrets/"]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["services"]["node-a"].update(volumes=["node-c-home:/var/lib/aipipe"]),
        lambda d: d["services"]["node-a"].update(depends_on={"hubb": {}}),
    ],
    ids=["undeclared-volume", "unknown-service"],
)
def test_the_compose_checks_reject_a_broken_file(tmp_path: Path, breakage: Any) -> None:
    data = compose()
    breakage(data)
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(data))

    with pytest.raises(ValueError):
        validate_compose(compose(broken))


def test_a_token_on_a_command_line_is_caught() -> None:
    data = compose()
    data["services"]["node-a"]["command"] = ["node", "init", "--token", "eyJhbGciOiJFZERTQSJ9"]
    assert plain_secrets(data) == ["node-a.command"]


# -- Dockerfile ----------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def torch_pin() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [d for d in project["dependencies"] if re.match(r"torch\s*==", d)]
    return pin.replace(" ", "")


def dockerfile_problems(text: str) -> list[str]:
    steps = instructions(text)
    args = dict(a.partition("=")[::2] for w, a in steps if w == "ARG" and "=" in a)
    problems = []
    bases = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), "?"), a.split()[0])
             for w, a in steps if w == "FROM"]  # fmt: skip
    if not bases or any(base != "python:3.11-slim" for base in bases):
        problems.append(f"base images {bases}, not python:3.11-slim")
    final = max(i for i, (w, _) in enumerate(steps) if w == "FROM")
    users = [a for w, a in steps[final:] if w == "USER"]
    entry = [i for i, (w, _) in enumerate(steps) if w == "ENTRYPOINT"]
    user_at = [i for i, (w, _) in enumerate(steps) if w == "USER" and i > final]
    if (
        not users
        or users[-1].split(":")[0] in ("root", "0")
        or not users[-1].split(":")[0].isdigit()
    ):
        problems.append(
            f"the final stage runs as {users[-1] if users else 'root'}, not a fixed UID"
        )
    if not entry or not user_at or user_at[-1] > entry[-1]:
        problems.append("no non-root USER before ENTRYPOINT")
    if not entry or json.loads(steps[entry[-1]][1]) != ["aipipe"]:
        problems.append('ENTRYPOINT is not ["aipipe"]')
    health = [a for w, a in steps[final:] if w == "HEALTHCHECK"]
    if not health or "/healthz" not in text:
        problems.append("no HEALTHCHECK on /healthz")
    if torch_pin() not in text or "whl/cpu" not in text:
        problems.append(f"torch is not installed as {torch_pin()} from the CPU index")
    for word, rest in steps:
        if word in ("ENV", "ARG") and re.search(r"TOKEN|PASSWORD|SECRET|_KEY\b", rest, re.I):
            problems.append(f"{word} {rest} bakes a secret into the image")
    if SECRETISH.search(text):
        problems.append("a token or private key is written in the Dockerfile")
    return problems


def test_the_dockerfile_is_slim_non_root_healthchecked_and_pins_torch() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []
    assert f"USER {UID}:{UID}" in DOCKERFILE.read_text()


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("USER 10001:10001", "USER root", "not a fixed UID"),
        ("USER 10001:10001\n", "", "no non-root USER"),
        ("ARG PYTHON_IMAGE=python:3.11-slim", "ARG PYTHON_IMAGE=python:3.11", "not python:3.11-"),
        ("HEALTHCHECK", "# HEALTHCHECK", "no HEALTHCHECK"),
        ("torch==2.13.0", "torch==2.12.0", "torch is not installed"),
        ("ENV PATH=", "ENV AIPIPE_TOKEN=x PATH=", "bakes a secret"),
    ],
)
def test_the_dockerfile_checks_catch_a_broken_file(old: str, new: str, problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(problem in p for p in problems), problems


def test_the_build_context_is_the_package_only() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!aipipe/"]
    copied = [a for w, a in instructions(DOCKERFILE.read_text()) if w == "COPY"]
    assert all(".env" not in c and "secrets" not in c for c in copied), copied
