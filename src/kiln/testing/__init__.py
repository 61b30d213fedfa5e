"""``kiln test``: acceptance suites run against a live, sealed, ephemeral instance.

The instance runs from the very image that will be released, on the same
runtime releases use; the results are stored as an attestation bound to the
image's digest, which environments with ``require_tests`` demand.
"""
