"""SQLite stores: the node's local data store (the hub's store lives beside it later)."""

from aipipe.store.node_store import NodeStore, WriteOutcome

__all__ = ["NodeStore", "WriteOutcome"]
