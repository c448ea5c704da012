"""A small gRPC client over HTTP/2 (``h2``) on asyncio, for the node proxy's two gRPC clients.

Why not grpcio: the node proxy must stay small (issue 8, <= 40 MB RSS with 1000 workloads) and grpcio costs
~9 MB at import plus its threads and arenas at run time, while ``h2`` is already loaded for HBONE. The
control plane (the servers) keeps grpcio; this module only speaks the client side of the gRPC HTTP/2
protocol, and imports neither grpc nor cryptography.

What it does::

    channel = Channel("istiod.istio-system.svc:15012", ssl_context=client_ssl_context(roots_pem),
                      server_name="istiod.istio-system.svc")
    reply = await channel.unary_unary("/pkg.Service/Method", request_bytes, metadata=[("k", "v")], timeout=5)
    call = await channel.stream_stream("/pkg.Service/Bidi")
    await call.write(b"..."); await call.done_writing()
    while (msg := await call.read()) is not None: ...     # None: the server ended with status OK
    call.cancel()                                         # RST_STREAM(CANCEL)
    await channel.close()

* One connection per channel (TLS with ALPN ``h2``, or plaintext), multiplexing every call. A connection
  that died or got a GOAWAY is replaced on the next call (lazy reconnect); losing it fails its open calls
  with ``UNAVAILABLE``. After a GOAWAY the calls the server accepted run to their end (grpc's max
  connection age and graceful stop depend on that); the others fail with ``UNAVAILABLE``. Optional
  keepalive PINGs find a peer that went silent; the server's PINGs are answered (by h2).
* Messages are bytes (callers serialize); the 5-byte length prefix is added and parsed here. Compressed
  messages are refused: we advertise ``grpc-accept-encoding: identity`` only.
* Flow control both ways: received DATA is acknowledged as it is needed to complete a message and, once
  whole messages are queued, only as the reader takes them, so a slow reader holds back the server instead
  of buffering without bound; sending waits for the peer's stream and connection windows.
* Errors are :class:`RpcError` with a :class:`StatusCode` (the standard numbers) and the server's
  percent-decoded ``grpc-message``; an HTTP status other than 200 without ``grpc-status`` maps to a code as
  the gRPC HTTP mapping says.
"""

from __future__ import annotations

import logging

from istiopy.api.grpc_h2.call import Call
from istiopy.api.grpc_h2.channel import Channel
from istiopy.api.grpc_h2.status import Metadata, RpcError, StatusCode, encode_timeout
from istiopy.api.grpc_h2.target import client_ssl_context, parse_target

__all__ = [
    "Call",
    "Channel",
    "Metadata",
    "RpcError",
    "StatusCode",
    "client_ssl_context",
    "encode_timeout",
    "parse_target",
]

# hpack logs every header it encodes at DEBUG, values included (our bearer tokens); a node proxy run with
# --log-level debug must not write credentials to its log, so its debug output is off.
logging.getLogger("hpack").setLevel(logging.INFO)
