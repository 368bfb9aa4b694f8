"""Round protocols at the hub: one `RoundProtocol` (`protocol`) per secure mode — plain,
SecAgg+, CKKS — each working through a `RoundContext` (`context`: stores, audit, model registry,
clock); `HubService` picks one by the study's `secure:` from `registry.PROTOCOLS`.

This package module imports nothing, so each module in it imports only what it uses."""
