"""End-to-end tests on one real Airflow deployment shared by the package (``conftest.py``)."""

#: The deployment's users (SimpleAuthManager): name -> (role, password).
USERS = {"admin": ("ADMIN", "admin-pw"), "viewer": ("VIEWER", "viewer-pw"), "nobody": ("", "nobody-pw")}
DAG_ID = "gpu_training"
#: A webhook URL carrying its token in its path and query, where nothing answers (the port is
#: reserved by nobody: 9 is "discard", closed on loopback): its failures must never show it.
TOKEN_HOOK_URL = "http://127.0.0.1:9/hooks/cluster-path-token-3c9f1e?sig=cluster-query-secret-8a2d"
