"""Keys, signatures and (later) secure aggregation."""

from aipipe.secure.identity import Identity, verify_signature

__all__ = ["Identity", "verify_signature"]
