"""Who may see and cancel which job: the api-server's own authentication and auth manager.

Every endpoint needs an authenticated Airflow user (``GetUserDep``: a ``Bearer`` token from
``POST /auth/token``, or the UI's session cookie). Access is per DAG, decided by the configured auth
manager: reading a job needs read (``GET``) access to its ``dag_id``; cancelling it needs edit
(``PUT``) access to that DAG's runs, as marking a dag run failed does. Lists only hold jobs of the
DAGs the user can read, and promotion decisions (``/v1/models``) only those whose ``dag_id`` (the
retraining DAG that decided) the user can read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Annotated

from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager, ResourceMethod
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import AuthManagerDep, GetUserDep
from fastapi import Depends, HTTPException, status


def _multi_team() -> bool:
    from airflow.configuration import conf

    return conf.getboolean("core", "multi_team", fallback=False)


class DagAccess:
    """The current user's access to DAGs, asked of the auth manager (one instance per request)."""

    def __init__(self, auth_manager: BaseAuthManager, user: BaseUser) -> None:
        self.auth_manager = auth_manager
        self.user = user

    def _teams(self, dag_ids: Collection[str]) -> dict[str, str | None]:
        """The team of each DAG; only looked up (in Airflow's metadata DB) in multi-team mode."""
        if not dag_ids or not _multi_team():
            return {}
        from airflow.models.dag import DagModel

        return DagModel.get_dag_id_to_team_name_mapping(list(dag_ids))

    def _allowed(self, method: ResourceMethod, dag_id: str, entity: DagAccessEntity | None = None) -> bool:
        details = DagDetails(id=dag_id, team_name=self._teams([dag_id]).get(dag_id))
        return self.auth_manager.is_authorized_dag(method=method, access_entity=entity, details=details, user=self.user)

    def can_read(self, dag_id: str) -> bool:
        return self._allowed("GET", dag_id)

    def can_edit_runs(self, dag_id: str) -> bool:
        return self._allowed("PUT", dag_id, DagAccessEntity.RUN)

    def readable(self, dag_ids: Collection[str]) -> set[str]:
        """Those of ``dag_ids`` the user can read."""
        teams = self._teams(dag_ids)
        by_team: dict[str | None, set[str]] = defaultdict(set)
        for dag_id in dag_ids:
            by_team[teams.get(dag_id)].add(dag_id)
        allowed: set[str] = set()
        for team, ids in by_team.items():
            allowed |= self.auth_manager.filter_authorized_dag_ids(
                dag_ids=ids, user=self.user, method="GET", team_name=team
            )
        return allowed

    def require_read(self, dag_id: str) -> None:
        if not self.can_read(dag_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: no read access to DAG {dag_id!r}")

    def require_edit_runs(self, dag_id: str) -> None:
        if not self.can_edit_runs(dag_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: no edit access to the runs of DAG {dag_id!r}")


def dag_access(user: GetUserDep, auth_manager: AuthManagerDep) -> DagAccess:
    """The dependency of every endpoint: 401 without a valid user, then per-DAG checks."""
    return DagAccess(auth_manager, user)


DagAccessDep = Annotated[DagAccess, Depends(dag_access)]
