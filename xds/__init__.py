"""xDS: sans-I/O stream state, snapshot cache, generators (pure model -> protobuf) and the ADS server.

Module map (each module's docstring has the details and the reasons):

- ``types``     type URLs, ADS push order (CDS, EDS, LDS, RDS, SDS, Address, Authorization, others).
- ``cache``     ``CachedResource`` (serialized once, sha256 version, pre-encoded response entries),
                ``TypedResources`` (one type's immutable collection + content version + shared diffs),
                ``Snapshot`` (immutable, ``consistent()``), ``SnapshotCache`` (per node id, watchable).
- ``stream``    the protocol core per stream, no I/O: ``SotwStream`` / ``DeltaStream`` with
                ``handle_request(req, now)`` and ``responses(now)``.
- ``proxy``     ``Proxy``: node id/metadata parsed + authenticated identity.
- ``registry``  ``Generator`` (pure ``generate(store, proxy)``, ``affects(change, proxy)``, ``scope(proxy)``,
                ``proxy_kinds``) and ``GeneratorRegistry`` (``register`` / ``find``).
- ``push``      ``Debouncer`` (sans-I/O) and ``PushPipeline``: store changes -> debounce -> regenerate what
                is affected, once per scope -> hand snapshots to affected connections.
- ``server``    grpcio ``aio`` ADS server (``XdsServer``, ``ServerOptions``, ``TlsConfig``, auth hook).
- ``debug``     monitoring HTTP: ``/metrics``, ``/debug/syncz``, ``/debug/configz``, ``/debug/snapshotz``.
- ``service``   ``XdsService``: pipeline + server + monitoring as one control-plane component.
- ``envoygen``  the minimal Envoy generators (clusters, endpoints, one HTTP listener, routes by Host).
- ``wds`` / ``wads``  ztunnel's Address and Authorization generators (registered by ``istiod``).

The wire-level client lives in ``istiopy.api.xds_client`` (the data plane may import only ``api``).
"""
