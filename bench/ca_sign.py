"""CSR signings per second through the CA's signer, against raw ``cryptography`` signing as the baseline.

For each CSR key type (ECDSA P-256, RSA 2048) and each CA key type (the default P-256 root and the RSA 2048
option), measures:

* ``signer``: ``Signer.sign_csr`` - parse + vet the CSR (signature check, SAN check), build and sign the
  leaf, PEM-encode the response chain: what one ``CreateCertificate`` costs minus gRPC and auth;
  Most of the gap on ECDSA CSRs is the CSR signature check (an ECDSA verify costs more than a sign),
  which proves the caller holds the key and is not optional;
* ``raw``: ``cryptography`` building and signing the same certificate (same extensions) from an
  already-parsed public key: the irreducible cost. The ratio signer/raw shows our overhead.

Run: ``.venv/bin/python bench/ca_sign.py [--seconds 2]``. Figures depend on the machine; no thresholds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from istiopy.api.identity import SpiffeId
from istiopy.ca.authority import CaMaterial, KeyType, SigningKey, generate_root, hash_for
from istiopy.ca.signer import LEAF_EKU, LEAF_KEY_USAGE, Signer

IDENTITY = SpiffeId("cluster.local", "default", "bench")


def make_csr(kind: str) -> tuple[str, x509.CertificateSigningRequest]:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(IDENTITY.uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), csr


def rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="measuring time per cell")
    args = ap.parse_args()

    rows = []
    for ca_kind in (KeyType.EC_P256, KeyType.RSA_2048):
        material = generate_root("cluster.local", ca_kind)
        signer = Signer(material)
        ca_key, algo = material.signing_key, hash_for(material.signing_key)
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        for csr_kind, label in (("ec", "ECDSA P-256"), ("rsa", "RSA 2048")):
            pem, csr = make_csr(csr_kind)
            pub = csr.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)

            def ours(pem: str = pem, signer: Signer = signer) -> object:
                return signer.sign_csr(pem, IDENTITY, 86400)

            def raw(
                pub: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = pub,
                material: CaMaterial = material,
                ca_key: SigningKey = ca_key,
                algo: hashes.SHA256 | hashes.SHA384 = algo,
                aki: x509.AuthorityKeyIdentifier = aki,
            ) -> object:
                now = dt.datetime.now(dt.UTC)
                return (
                    x509.CertificateBuilder()
                    .subject_name(x509.Name([]))
                    .issuer_name(material.signing_cert.subject)
                    .public_key(pub)
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now)
                    .not_valid_after(now + dt.timedelta(days=1))
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(aki, critical=False)
                    .add_extension(LEAF_KEY_USAGE, critical=True)
                    .add_extension(LEAF_EKU, critical=False)
                    .add_extension(
                        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(IDENTITY.uri)]),
                        critical=True,
                    )
                    .sign(ca_key, algo)
                )

            r_ours, r_raw = rate(ours, args.seconds), rate(raw, args.seconds)
            rows.append((str(ca_kind), label, r_ours, r_raw))

    print(f"{'CA key':<10} {'CSR key':<12} {'signer/s':>10} {'raw/s':>10} {'signer/raw':>11}")
    for ca_kind, label, r_ours, r_raw in rows:
        print(f"{ca_kind:<10} {label:<12} {r_ours:>10.0f} {r_raw:>10.0f} {r_ours / r_raw:>10.2f}x")


if __name__ == "__main__":
    main()
