"""The session fixtures of this suite (``k8s_cluster``, ``k8s_kubelet``) live in ``tests/conftest.py``,
shared with ``tests/operator``: one cluster per session, whichever suite asks first."""
