"""Settings: pydantic models built once at the edge (CLI, ASGI factory) and passed down.

Library code never reads the environment; `aipipe.cli` builds these from YAML files and
`AIPIPE_*` variables.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aipipe.errors import ConfigError, NodeNotFoundError
from aipipe.secure.at_rest import PLAIN, AtRest, AtRestConfig
from aipipe.secure.keyfiles import write_private

NODE_CONFIG = "node.yaml"


class NodeConfig(BaseModel):
    """The node's `node.yaml`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    created: str
    store: str = "store.sqlite"
    identity_key: str = "identity.key"
    pseudonym_key: str = "pseudonym.key"
    audit_log: str = "audit.sqlite"
    hub_url: str | None = None
    hub_ca: str | None = None  # PEM of the CA that signs the hub's certificate (node init --hub-ca)
    # True when hub_ca came pinned in the enrolment token: the hub is verified against it alone.
    hub_ca_pinned: bool = False
    allow_non_private: bool = False
    smart_client_id: str | None = None
    smart_key: str = "smart.key"
    sealing_key: str = "sealing.key"
    secure_dir: str = "secure"
    # Set by `node init --at-rest-key-file`: the id of the key the home is sealed under.
    at_rest: AtRestConfig | None = None


class NodePaths:
    """Resolved paths of one node home, and how its private data rests (`at_rest`)."""

    def __init__(self, home: Path, config: NodeConfig, at_rest: AtRest = PLAIN) -> None:
        self.home = home
        self.config = config
        self.at_rest = at_rest
        self.store = home / config.store
        self.identity_key = home / config.identity_key
        self.pseudonym_key = home / config.pseudonym_key
        self.cds_link_key = home / "cds-link.key"  # signs model card links (aipipe.cds.links)
        self.audit_log = home / config.audit_log
        self.smart_key = home / config.smart_key
        self.sealing_key = home / config.sealing_key
        self.secure_dir = home / config.secure_dir
        self.config_file = home / NODE_CONFIG


def load_node_config(home: Path) -> NodePaths:
    path = home / NODE_CONFIG
    if not path.is_file():
        raise NodeNotFoundError(
            f"no node at {home} (missing {NODE_CONFIG}); run: aipipe node init --home {home}"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = NodeConfig.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path} is not a valid node config: {exc}") from exc
    return NodePaths(home, config)


def save_node_config(home: Path, config: NodeConfig) -> None:
    text = yaml.safe_dump(config.model_dump(), sort_keys=False)
    write_private(home / NODE_CONFIG, text.encode("utf-8"), what="node config")
