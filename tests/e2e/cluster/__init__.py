"""End-to-end tests on one real Airflow deployment shared by the package (``conftest.py``)."""

#: The deployment's users (SimpleAuthManager): name -> (role, password).
USERS = {"admin": ("ADMIN", "admin-pw"), "viewer": ("VIEWER", "viewer-pw"), "nobody": ("", "nobody-pw")}
DAG_ID = "gpu_training"
