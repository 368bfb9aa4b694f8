"""The hidden `node start --attack NAME[:PARAM]`: a poisoning node, for tests and benchmarks
only (`aipipe.attacks`, issue 14). Warned on the console and audited in the node's own log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aipipe.cli.render import err_console

if TYPE_CHECKING:
    from aipipe.attacks import Attack
    from aipipe.node.node import Node


def parse_attack(spec: str) -> Attack:
    """`NAME[:PARAM]` → the attack, refused before the node opens if unknown or malformed."""
    from aipipe.attacks import parse_attack as parse  # imports torch: only when asked

    return parse(spec)


def enable_attack(node: Node, attack: Attack) -> None:
    """Warn loudly and write `attack.enabled` (the attack and its settings) to the audit log."""
    err_console.print(
        f"[bold red]WARNING: node {node.name} is MALICIOUS: it runs the attack '{attack.name}' "
        "on every update it sends; for tests and benchmarks only, never with real studies[/]"
    )
    node.audit.append("attack.enabled", actor=node.name, details=attack.describe())
