"""Kubernetes mode: kopf handlers feeding the mesh store, the waypoint reconciler and status writers.

Modules (the operator imports ``api`` and ``mesh`` only; istiod wires it to xDS and the CA):

* ``kubeapi`` - ``KubeApi``: JSON over kubernetes_asyncio's ApiClient (kubeconfig or in-cluster), and
  kopf's login derived from the same configuration;
* ``config`` - ``OperatorConfig`` (namespace, Lease, webhook, watch timeouts) and ``WaypointTemplate``
  (image ``<hub>/waypoint:<tag>`` or ``image``, ``args``, ``env``, resources);
* ``sources`` - ``KubeSource``: ``@kopf.on.event`` watches of core, discovery, Istio and Gateway API kinds
  -> ``mesh.kinds.parse`` -> ``store.apply/delete`` (source ``kube``), invalid objects remembered, resync;
* ``leader`` - ``LeaderElector`` on a ``coordination.k8s.io`` Lease (client-go semantics);
* ``waypoints`` - desired ServiceAccount/Deployment/Service of a waypoint Gateway, Gateway and
  GatewayClass status;
* ``status`` - ``StatusWriter``: conditions and validationMessages on Istio resources from ``mesh.analysis``;
* ``webhook`` - the validating admission webhook (15017) and its ValidatingWebhookConfiguration;
* ``runner`` - ``KubeOperator``: all of the above as one component; ``await op.run()`` in istiod's loop.

Wiring (see ``istiopy.istiod.kube``)::

    api = await KubeApi.connect(kubeconfig)              # None: $KUBECONFIG, else in-cluster
    op = KubeOperator(plane.store, api, OperatorConfig(...), serving_cert=provider)
    plane.add("kube-operator", op.run)                   # xDS and CA read plane.store as usual

``serving_cert`` is a callable returning ``webhook.ServingCert`` (key, chain, CA bundle); istiod passes one
backed by the mesh CA so every replica's webhook certificate verifies against the same bundle. Without it
the webhook uses a self-signed certificate (single replica only).
"""
