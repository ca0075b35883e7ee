"""Who may see and cancel which job: the api-server's own authentication and auth manager.

Every endpoint needs an authenticated Airflow user (``GetUserDep``: a ``Bearer`` token from
``POST /auth/token``, or the UI's session cookie). Access is per DAG, decided by the configured auth
manager: reading a job needs read (``GET``) access to its ``dag_id``; cancelling it needs edit
(``PUT``) access to that DAG's runs, as marking a dag run failed does. Lists only hold jobs of the
DAGs the user can read, and promotion decisions (``/v1/models``) only those whose ``dag_id`` (the
retraining DAG that decided) the user can read.

**Cross-site requests.** A browser sends the ``_token`` cookie with any request to the api-server,
whichever page asks for it; Airflow 3.3.2 relies on the cookie's ``SameSite=Lax`` alone (no CSRF
token, no ``Origin`` check), which still lets a page of another origin on the same site (another
port, a sibling host) POST with it. So a state-changing request of this API that is authenticated
by the cookie, not by an ``Authorization: Bearer`` header, must say it comes from the api-server's
own origin: its ``Origin`` header (or, without one, its ``Referer``) must be the request's own
scheme, host and port, or those of ``[api] base_url``, as Airflow's ``is_safe_url`` trusts them
(behind a TLS-terminating proxy: ``[api] base_url`` or the api-server's ``--proxy-headers``).
Bearer clients (curl, scripts) carry no ambient credential and are not asked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Annotated
from urllib.parse import urlsplit

from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager, ResourceMethod
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import AuthManagerDep, GetUserDep, bearer_scheme
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials


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


#: Methods that change something: the ones a cookie-authenticated request must make from our origin.
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str | None) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL, lower case, the default port left out; None for
    anything else (``null``, another scheme, garbage)."""
    if not url:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def own_origins(request: Request) -> set[str]:
    """The api-server's origins: the one this request was sent to, and ``[api] base_url``'s."""
    from airflow.configuration import conf

    found = {origin_of(str(request.base_url)), origin_of(conf.get("api", "base_url", fallback=None))}
    return {origin for origin in found if origin}


def same_origin_unless_bearer(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """A state-changing request authenticated by the session cookie comes from our own origin (see
    the module's docstring), else 403. Runs after authentication: no credential at all is a 401."""
    if request.method not in STATE_CHANGING_METHODS:
        return
    if bearer is not None and bearer.scheme.lower() == "bearer":
        return  # what Airflow's get_user authenticated: the header, never the cookie
    header = "Origin" if "origin" in request.headers else "Referer"
    sent = request.headers.get(header)
    if origin_of(sent) in own_origins(request):
        return
    said = f"{header} {sent[:200]!r}" if sent else "neither an Origin nor a Referer header"
    raise HTTPException(
        status.HTTP_403_FORBIDDEN,
        f"Forbidden: a {request.method} authenticated by the Airflow session cookie must come from this "
        f"api-server's own pages, and this one has {said}. Scripts authenticate with "
        "'Authorization: Bearer <token from POST /auth/token>' instead.",
    )
