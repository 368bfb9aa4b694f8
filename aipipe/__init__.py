"""aipipe: federated learning for hospitals.

Patient data stays at each institution. A node ingests FHIR R4 data into a local SQLite store,
builds a study's features and trains with differential privacy; a hub aggregates updates it
cannot read one by one. See DESIGN.md for the architecture.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aipipe")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
