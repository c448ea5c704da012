"""The netns testing kit builds real pods on real namespaces and leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from istiopy.testing.netns import Topology, list_netns

pytestmark = pytest.mark.netns


def _echo_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_two_nodes_two_pods_reach_each_other(topology: Topology) -> None:
    n0, n1 = topology.add_node("node-0"), topology.add_node("node-1")
    pods = [topology.add_pod(f"p{i}", node=n) for i, n in enumerate([n0, n0, n1, n1])]
    assert len({p.ip for p in pods}) == 4
    assert pods[0].ip.startswith("10.244.0.")
    assert pods[2].ip.startswith("10.244.1.")
    servers = [p.spawn_server("echo", port=7000) for p in pods]
    assert all(s.port == 7000 for s in servers)
    for src in pods:
        for dst in pods:
            with src.connect((dst.ip, 7000)) as s:
                msg = f"{src.name}->{dst.name}".encode()
                assert _echo_roundtrip(s, msg) == msg
                assert s.getsockname()[0] == src.ip  # the app's source IP is its pod IP
    # nodes are on the fabric too (a ztunnel in the node netns can reach pods)
    with n1.connect((pods[0].ip, 7000)) as s:
        assert _echo_roundtrip(s, b"from-node") == b"from-node"


def test_http_server_reports_peer_and_pod(topology: Topology) -> None:
    a = topology.add_pod("a")
    b = topology.add_pod("b", namespace="other", ip="10.244.0.77", service_account="bob")
    b.spawn_server("http", port=8080)
    with a.connect((b.ip, 8080)) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["pod"] == "b"
    assert body["path"] == "/hello"
    assert body["peer"].startswith(a.ip + ":")
    assert b.spiffe_id() == "spiffe://cluster.local/ns/other/sa/bob"


def test_pods_are_isolated_from_the_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Topology() as topo:
        a = topo.add_pod("a")
        routes = a.run(["ip", "route"]).stdout
        assert "default dev eth0" in routes
        # the host netns has no link to the fabric (and no address of it): veths live only in our namespaces
        host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        host_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert topo.tag not in host_links
        assert f" {a.ip}/" not in host_addrs
        fabric_links = subprocess.run(
            ["ip", "-n", topo.fabric, "-o", "link"], capture_output=True, text=True, check=True
        ).stdout
        assert "br0" in fabric_links
        assert "link-netns" in fabric_links


def test_teardown_removes_everything_even_on_failure() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    topo = Topology()
    procs = []

    def build_then_fail() -> None:
        with topo:
            pod = topo.add_pod("a")
            topo.add_pod("b")
            procs.append(pod.spawn_server("echo", port=0))
            pod.run(["iptables", "-t", "nat", "-N", "ISTIOPY_TEST"])
            assert len(topo.netns_names()) == 4  # fabric, node, 2 pods
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_then_fail()
    assert topo.netns_names() == []
    assert not any(n.startswith(topo.tag) for n in list_netns())
    assert not procs[0].alive()


def test_remove_pod_and_leftover_cleanup() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # a "crashed run": namespaces named after a pid that no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"ipy-{dead.pid}-0-p9"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Topology() as topo:  # cleans leftovers of dead owners on start
            assert stale not in list_netns()
            a, b = topo.add_pod("a"), topo.add_pod("b")
            topo.remove_pod(a)
            assert a.netns not in list_netns()
            assert b.netns in list_netns()
            assert topo.pods == [b]
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)


def test_sigterm_tears_down() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    script = (
        "import os, signal, sys, time\n"
        "from istiopy.testing.netns import Topology\n"
        "with Topology() as t:\n"
        "    t.add_pod('a').spawn_server('echo', port=0)\n"
        "    print(t.tag, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tag = proc.stdout.readline().strip()
    assert any(n.startswith(tag + "-") for n in list_netns())
    proc.terminate()
    assert proc.wait(30) == 128 + 15
    assert not any(n.startswith(tag + "-") for n in list_netns())


def test_node_reaches_host_loopback_through_forward(topology: Topology) -> None:
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen(1)
    port = host.getsockname()[1]

    def serve() -> None:
        conn, _ = host.accept()
        with conn:
            conn.sendall(b"control plane:" + conn.recv(100))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    node = topology.add_node("n0")
    assert node.forward_host_port(port) == port
    out = node.run(
        [sys.executable, "-c", f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
         "s.sendall(b'hi'); print(s.recv(100).decode())"]
    ).stdout  # fmt: skip
    assert out.strip() == "control plane:hi"
    t.join(5)
    host.close()
