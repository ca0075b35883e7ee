"""``[core] hostname_callable`` of the harness's Celery workers (``tests/airflow_cluster.py``).

Both workers run on one machine, so the default (the FQDN) would record the same host on every task
instance; each worker's name instead shows which worker ran a task, as separate hosts would.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("AIRFLOW_CLUSTER_HOSTNAME") or socket.getfqdn()
