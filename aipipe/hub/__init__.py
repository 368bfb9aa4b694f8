"""The hub: enrols nodes, runs rounds, aggregates sums, versions models."""
