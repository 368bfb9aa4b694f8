"""Who is asking the hub: a `Principal` holds one `Role` (what each may do:
`aipipe.hub.roles`; what a node may read: `aipipe.hub.access`). Kept apart so that the people
and token code, and the CLI that opens a hub home, need none of the round machinery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "scientist", "auditor", "node"]


@dataclass(frozen=True)
class Principal:
    kind: Role
    name: str
