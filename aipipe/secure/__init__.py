"""Keys, signatures and the secure-aggregation primitives.

Import the primitives from their modules (`aipipe.secure.fixedpoint`, `aipipe.secure.secagg`,
`aipipe.secure.ckks`, `aipipe.secure.sealedbox`, `aipipe.secure.encoding`) so that commands
which only need an identity do not load TenSEAL. Hub and node rounds use them through
`aipipe.hub.secure` and `aipipe.node.secure_rounds` when a study says `secure: secagg | ckks`.
"""

from aipipe.secure.identity import Identity, verify_signature

__all__ = ["Identity", "verify_signature"]
