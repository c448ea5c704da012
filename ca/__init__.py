"""The built-in SPIFFE CA: root of trust, signer, caller authentication and the certificate service.

Modules:

* ``authority`` - CA material (self-signed root or plug-in ``cacerts`` intermediate), the ``RootStore``
  protocol and its standalone ``DirectoryRootStore``;
* ``signer`` - CSR vetting and certificate issuance (workload, istiod serving, node bootstrap);
* ``auth`` - authenticators (client certificate, static token file, Kubernetes TokenReview protocol) and
  the xDS stream adapter ``stream_authenticator``;
* ``node_auth`` - the node-proxy impersonation rule (``NodeAuthorizer``);
* ``server`` - the ``IstioCertificateService`` servicer (``CaServicer``) and a standalone ``serve``;
* ``sds`` - ``default``/``ROOTCA`` secrets for Envoy waypoints and their rotation (``WaypointSecrets``);
* ``bundle`` / ``kube`` - trust bundle publication (file; ConfigMap) and the root Secret store;
* ``service`` - ``CaConfig`` and ``start_authority``, which assemble the above.

Wiring in istiod (sketch)::

    ca = await start_authority(CaConfig(root_dir=..., cacerts_dir=...), publishers=[...])
    serving = ca.issue_serving(["istiod.istio-system.svc"], ips)       # TLS for 15012
    servicer = ca.servicer([token_auth, ca.client_cert_authenticator()], store, metrics_registry)
    # mount servicer.add_to_server(grpc_server) on the 15012 server next to ADS
    secrets = WaypointSecrets(ca)
    registry.register(Generator(**generator_fields(secrets)))
    secrets.subscribe(lambda ident: pipeline.push([rotation_change(ident)]))  # schedule as a task
    control_plane.add("sds-rotation", secrets.run)
"""
