"""Test kit for ztunnel-py: builders for WDS/WADS resources and helpers to run the proxy.

Why builders: ``istio.workload.Address`` and ``istio.security.Authorization`` messages are deep and easy to
get subtly wrong by hand (raw address bytes, the ``services`` port map, the oneofs). These helpers produce
exactly what istiod's generators send, so tests of the node proxy read like the mesh they describe.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from istiopy.api.gen import authorization_pb2, workload_pb2

CLUSTER = "Kubernetes"


def ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def gateway(
    *, address: str | None = None, hostname: str | None = None, namespace: str = "", network: str = ""
) -> workload_pb2.GatewayAddress:
    """A waypoint/gateway reference by service hostname (``namespace/hostname``) or by address."""
    gw = workload_pb2.GatewayAddress(hbone_mtls_port=15008)
    if hostname is not None:
        gw.hostname.CopyFrom(workload_pb2.NamespacedHostname(namespace=namespace, hostname=hostname))
    elif address is not None:
        gw.address.CopyFrom(workload_pb2.NetworkAddress(network=network, address=ip_bytes(address)))
    return gw


def pod_uid(namespace: str, name: str, cluster: str = CLUSTER) -> str:
    return f"{cluster}//Pod/{namespace}/{name}"


def workload(
    name: str,
    namespace: str,
    ip: str | Sequence[str],
    *,
    service_account: str = "default",
    node: str = "node-a",
    hbone: bool = True,
    services: Mapping[str, Mapping[int, int]] | None = None,
    waypoint: workload_pb2.GatewayAddress | None = None,
    policies: Iterable[str] = (),
    healthy: bool = True,
    trust_domain: str = "",
    network: str = "",
    uid: str | None = None,
    canonical_name: str = "",
) -> workload_pb2.Address:
    """An ``Address`` carrying one pod's Workload; ``services`` maps ``ns/host`` -> {service port: target}."""
    ips = [ip] if isinstance(ip, str) else list(ip)
    wl = workload_pb2.Workload(
        uid=uid or pod_uid(namespace, name),
        name=name,
        namespace=namespace,
        addresses=[ip_bytes(a) for a in ips],
        network=network,
        tunnel_protocol=workload_pb2.HBONE if hbone else workload_pb2.NONE,
        trust_domain=trust_domain,
        service_account=service_account if service_account != "default" else "",
        node=node,
        workload_name=name.rsplit("-", 1)[0] if "-" in name else name,
        workload_type=workload_pb2.DEPLOYMENT,
        canonical_name=canonical_name or name,
        canonical_revision="latest",
        authorization_policies=list(policies),
        status=workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY,
        cluster_id=CLUSTER,
    )
    if waypoint is not None:
        wl.waypoint.CopyFrom(waypoint)
    for key, ports in (services or {}).items():
        wl.services[key].ports.extend(
            workload_pb2.Port(service_port=sp, target_port=tp) for sp, tp in ports.items()
        )
    return workload_pb2.Address(workload=wl)


def service(
    name: str,
    namespace: str,
    vips: str | Sequence[str],
    ports: Mapping[int, int],
    *,
    waypoint: workload_pb2.GatewayAddress | None = None,
    domain: str = "cluster.local",
    network: str = "",
) -> workload_pb2.Address:
    """An ``Address`` carrying a Service with the given VIPs and {service port: target port}."""
    vip_list = [vips] if isinstance(vips, str) else list(vips)
    svc = workload_pb2.Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.{domain}",
        addresses=[workload_pb2.NetworkAddress(network=network, address=ip_bytes(v)) for v in vip_list],
        ports=[workload_pb2.Port(service_port=sp, target_port=tp) for sp, tp in ports.items()],
    )
    if waypoint is not None:
        svc.waypoint.CopyFrom(waypoint)
    return workload_pb2.Address(service=svc)


def service_key(name: str, namespace: str, domain: str = "cluster.local") -> str:
    return f"{namespace}/{name}.{namespace}.svc.{domain}"


def resource_name(addr: workload_pb2.Address) -> str:
    """The xDS resource name istiod uses: the workload uid, or ``namespace/hostname`` for a service."""
    if addr.WhichOneof("type") == "workload":
        return addr.workload.uid
    return f"{addr.service.namespace}/{addr.service.hostname}"


# ---- policies -------------------------------------------------------------------------------------


def exact(s: str) -> authorization_pb2.StringMatch:
    return authorization_pb2.StringMatch(exact=s)


def prefix(s: str) -> authorization_pb2.StringMatch:
    return authorization_pb2.StringMatch(prefix=s)


def suffix(s: str) -> authorization_pb2.StringMatch:
    return authorization_pb2.StringMatch(suffix=s)


def presence() -> authorization_pb2.StringMatch:
    m = authorization_pb2.StringMatch()
    m.presence.SetInParent()
    return m


def cidr(spec: str) -> authorization_pb2.Address:
    net = ipaddress.ip_network(spec, strict=False)
    return authorization_pb2.Address(address=net.network_address.packed, length=net.prefixlen)


def match(**fields: object) -> authorization_pb2.Match:
    """A Match; string lists may be given as plain strings (exact), IP lists as CIDR strings."""
    m = authorization_pb2.Match()
    for key, values in fields.items():
        assert isinstance(values, list | tuple)
        target = getattr(m, key)
        for v in values:
            if key.endswith("ips"):
                target.append(cidr(v) if isinstance(v, str) else v)
            elif key.endswith("service_accounts"):
                ns, sa = v if isinstance(v, tuple) else str(v).split("/")
                target.append(authorization_pb2.ServiceAccountMatch(namespace=ns, serviceAccount=sa))
            elif key.endswith("ports"):
                target.append(int(v))  # type: ignore[call-overload]
            else:
                target.append(exact(v) if isinstance(v, str) else v)
    return m


def policy(
    name: str,
    namespace: str,
    rules: Sequence[Sequence[Sequence[authorization_pb2.Match]]],
    *,
    action: str = "ALLOW",
    scope: str = "NAMESPACE",
    dry_run: bool = False,
) -> authorization_pb2.Authorization:
    """An Authorization: ``rules`` is a list of rules, each a list of clauses, each a list of matches."""
    return authorization_pb2.Authorization(
        name=name,
        namespace=namespace,
        scope=authorization_pb2.Scope.Value(scope),
        action=authorization_pb2.Action.Value(action),
        dry_run=dry_run,
        rules=[
            authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=list(cl)) for cl in rule])
            for rule in rules
        ],
    )


# ---- capture ---------------------------------------------------------------------------------------

PROXY_MARK = 0x539


def capture_rules(
    outbound_port: int = 15001, inbound_plaintext_port: int = 15006, hbone_port: int = 15008
) -> str:
    """``iptables-restore`` input for in-pod capture, the shape upstream's node agent installs.

    Outbound TCP from the app goes to 15001, inbound TCP (except HBONE on 15008) to 15006; the proxy's own
    sockets carry ``PROXY_MARK`` and are left alone, as is loopback traffic. Used by tests until (and
    besides) the node agent, which owns the production version of these rules.
    """
    mark = f"{PROXY_MARK:#x}/0xfff"
    return "\n".join(
        [
            "*nat",
            ":ISTIO_PRERT - [0:0]",
            ":ISTIO_OUTPUT - [0:0]",
            "-A PREROUTING -j ISTIO_PRERT",
            "-A OUTPUT -j ISTIO_OUTPUT",
            f"-A ISTIO_PRERT -m mark --mark {mark} -j RETURN",
            f"-A ISTIO_PRERT -p tcp --dport {hbone_port} -j RETURN",
            "-A ISTIO_PRERT -i lo -j RETURN",
            f"-A ISTIO_PRERT -p tcp -j REDIRECT --to-ports {inbound_plaintext_port}",
            f"-A ISTIO_OUTPUT -m mark --mark {mark} -j RETURN",
            "-A ISTIO_OUTPUT -o lo -j RETURN",
            f"-A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports {outbound_port}",
            "COMMIT",
            "",
        ]
    )


def install_capture(pod: object) -> None:
    """Install :func:`capture_rules` inside a ``testing.netns.Pod`` (anything with ``run``)."""
    pod.run(["iptables-restore", "--noflush"], input=capture_rules())  # type: ignore[attr-defined]
