"""The built-in SPIFFE CA: root of trust, signer, caller authentication and the certificate service."""
