"""RequestAuthentication (targetRefs) at the waypoint: Envoy jwt_authn with Istio's semantics, plus
AuthorizationPolicy on requestPrincipals and claims."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from wp_helpers import istio, service
from wp_mesh import WaypointMesh

from istiopy.mesh.resources.security import RequestAuthentication
from istiopy.mesh.waypoint_diagnostics import waypoint_diagnostics

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

ISSUER = "https://issuer.example"
OTHER_ISSUER = "https://other.example"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """An RSA signing key and its JWKS."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> str:
        pub = self.key.public_key().public_numbers()
        n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
        e = pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")
        return json.dumps(
            {
                "keys": [
                    {"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig", "n": b64(n), "e": b64(e)}
                ]
            }
        )

    def token(
        self, iss: str = ISSUER, sub: str = "alice", aud: str = "shop", exp_in: int = 600, **claims: Any
    ) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        now = int(time.time())
        payload = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + exp_in, **claims}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(sig)}"


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer("k1")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def jwt_target(wmesh: WaypointMesh, issuer: Issuer) -> str:
    await wmesh.add_pod("jwt-1", "jwt")
    await wmesh.apply(service("jwt", wmesh.vip(40)))
    await wmesh.apply(
        istio(
            "RequestAuthentication",
            "jwt",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "jwt"}],
                "jwtRules": [
                    {
                        "issuer": ISSUER,
                        "audiences": ["shop"],
                        "jwks": issuer.jwks(),
                        "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}, {"name": "x-jwt"}],
                        "fromParams": ["token"],
                        "outputPayloadToHeader": "x-jwt-payload",
                        "forwardOriginalToken": True,
                    }
                ],
            },
            group="security.istio.io/v1",
        ),
        istio(
            "AuthorizationPolicy",
            "jwt",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "jwt"}],
                "rules": [
                    {"to": [{"operation": {"paths": ["/open*"]}}]},
                    {
                        "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                        "to": [{"operation": {"paths": ["/secure*"]}}],
                    },
                    {
                        "to": [{"operation": {"paths": ["/admin*"]}}],
                        "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}],
                    },
                ],
            },
            group="security.istio.io/v1",
        ),
    )
    return f"{wmesh.vip(40)}:80"


async def test_valid_invalid_expired_wrong_issuer_missing(
    wmesh: WaypointMesh, issuer: Issuer, jwt_target: str
) -> None:
    async def get(path: str, token: str | None) -> int:
        hdrs = {"authorization": f"Bearer {token}"} if token else {}
        return (await wmesh.request(jwt_target, path, headers=hdrs)).status

    assert await get("/secure", issuer.token()) == 200
    assert await get("/open", issuer.token()) == 200
    assert await get("/open", None) == 200  # missing token: passes, without identity
    assert await get("/secure", None) == 403  # ... so a policy asking for a principal denies
    assert await get("/open", issuer.token(exp_in=-120)) == 401  # expired
    assert await get("/open", issuer.token(iss=OTHER_ISSUER)) == 401  # wrong issuer
    # a valid token for another audience: Envoy's jwt_authn (so Istio too) answers 403, not 401
    r = await wmesh.request(jwt_target, "/open", headers={"authorization": f"Bearer {issuer.token(aud='x')}"})
    assert (r.status, r.text) == (403, "Audiences in Jwt are not allowed")
    assert await get("/open", Issuer("k1").token()) == 401  # right kid, wrong key
    assert await get("/open", issuer.token()[:-8] + "AAAAAAAA") == 401  # tampered signature
    assert await get("/admin", issuer.token(groups=["users", "admins"])) == 200
    assert await get("/admin", issuer.token(groups=["users"])) == 403


async def test_token_locations_and_outputs(wmesh: WaypointMesh, issuer: Issuer, jwt_target: str) -> None:
    backend = wmesh.backends["jwt-1"]
    token = issuer.token(sub="bob")
    assert (await wmesh.request(jwt_target, "/secure", headers={"x-jwt": token})).status == 200
    assert (await wmesh.request(jwt_target, f"/secure?token={token}")).status == 200
    r = await wmesh.request(jwt_target, "/secure", headers={"authorization": f"Bearer {token}"})
    assert r.status == 200
    seen = backend.headers[-1]
    assert seen["authorization"] == f"Bearer {token}"  # forwardOriginalToken
    payload = json.loads(base64.urlsafe_b64decode(seen["x-jwt-payload"] + "=="))
    assert (payload["sub"], payload["iss"]) == ("bob", ISSUER)


async def test_jwks_uri_fetched_through_a_cluster(wmesh: WaypointMesh) -> None:
    remote = Issuer("remote")
    fetches = 0

    async def jwks(_: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.Response(text=remote.jwks(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ip = f"{wmesh.prefix}.250"
    await web.TCPSite(runner, ip, 8081).start()
    try:
        await wmesh.add_pod("jwks-1", "jwksvc")
        await wmesh.apply(service("jwksvc", wmesh.vip(41)))
        await wmesh.apply(
            istio(
                "RequestAuthentication",
                "jwksvc",
                {
                    "targetRefs": [{"group": "", "kind": "Service", "name": "jwksvc"}],
                    "jwtRules": [
                        {
                            "issuer": "https://remote.example",
                            "jwksUri": f"http://{ip}:8081/jwks",
                            "forwardOriginalToken": False,
                        }
                    ],
                },
                group="security.istio.io/v1",
            )
        )
        target = f"{wmesh.vip(41)}:80"
        good = remote.token(iss="https://remote.example")
        r = await wmesh.request(target, "/", headers={"authorization": f"Bearer {good}"})
        assert r.status == 200, r
        assert fetches >= 1
        assert "authorization" not in wmesh.backends["jwks-1"].headers[-1]  # not forwarded
        bad = Issuer("remote").token(iss="https://remote.example")
        assert (await wmesh.request(target, "/", headers={"authorization": f"Bearer {bad}"})).status == 401
    finally:
        await runner.cleanup()


async def test_jwks_not_json_is_reported_and_fails_closed(wmesh: WaypointMesh, issuer: Issuer) -> None:
    await wmesh.add_pod("badjwks-1", "badjwks")
    await wmesh.apply(service("badjwks", wmesh.vip(42)))
    nacks = len(wmesh.nacks)
    ra = RequestAuthentication.model_validate(
        {
            "metadata": {"name": "badjwks", "namespace": "default"},
            "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "badjwks"}],
                "jwtRules": [{"issuer": ISSUER, "jwks": "this is {not json"}],
            },
        }
    )
    await wmesh.apply(ra)
    found = [d for d in waypoint_diagnostics(wmesh.store) if d.resource == ra.key]
    assert found
    assert found[0].field == "spec.jwtRules[0].jwks"
    assert "not JSON" in found[0].message
    target = f"{wmesh.vip(42)}:80"
    assert (
        await wmesh.request(target, "/", headers={"authorization": f"Bearer {issuer.token()}"})
    ).status == 401
    assert (await wmesh.request(target, "/")).status == 200
    assert len(wmesh.nacks) == nacks
