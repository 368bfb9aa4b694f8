"""Keys, signatures and the secure-aggregation primitives.

Import the primitives from their modules (`aipipe.secure.fixedpoint`, `aipipe.secure.secagg`,
`aipipe.secure.ckks`, `aipipe.secure.sealedbox`) so that commands which only need an identity
do not load TenSEAL. They are complete and tested in-process; wiring them into hub and node
rounds (`secure: secagg | ckks` in a study) is the next step of the secure-aggregation issue.
"""

from aipipe.secure.identity import Identity, verify_signature

__all__ = ["Identity", "verify_signature"]
