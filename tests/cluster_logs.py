"""``[logging] logging_config_class`` of the harness's api-server (``tests/airflow_cluster.py``).

Airflow's own logging configuration, but for where the api-server fetches a running task's log from
a Celery worker. In docker-compose.yaml each worker is a host of its own, serving its logs on port
8793 (``[logging] worker_log_server_port``), and the api-server fetches them from
``http://<the task instance's hostname>:8793``. The harness runs every worker on 127.0.0.1, where two
log servers cannot share a port and the workers' names (their task instances' hostnames) resolve to
nothing: each worker gets a port of its own, and ``AIRFLOW_CLUSTER_LOG_SERVERS`` (JSON, worker name
-> ``http://127.0.0.1:PORT``) tells the api-server which. The request, its signature (``[api]
secret_key``) and the answer are Airflow's; the triggerer's log server is reached unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any
from urllib.parse import urljoin

from airflow.config_templates.airflow_local_settings import DEFAULT_LOGGING_CONFIG
from airflow.utils.log.file_task_handler import FileTaskHandler, LogType


class ClusterTaskHandler(FileTaskHandler):
    """Airflow's task log handler, with the worker log servers of ``AIRFLOW_CLUSTER_LOG_SERVERS``."""

    def _get_log_retrieval_url(
        self, ti: Any, log_relative_path: str, log_type: LogType | None = None
    ) -> tuple[str | None, str | None]:
        url, relative = super()._get_log_retrieval_url(ti, log_relative_path, log_type=log_type)
        servers = json.loads(os.environ.get("AIRFLOW_CLUSTER_LOG_SERVERS") or "{}")
        if url and relative and log_type != LogType.TRIGGER and ti.hostname in servers:
            url = urljoin(servers[ti.hostname].rstrip("/") + "/log/", relative)
        return url, relative


LOGGING_CONFIG: dict[str, Any] = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
LOGGING_CONFIG["handlers"]["task"]["class"] = f"{__name__}.{ClusterTaskHandler.__qualname__}"
