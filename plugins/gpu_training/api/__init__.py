"""The results REST API: a FastAPI app the plugin mounts on Airflow's api-server under ``/training``.

``app.py`` builds the app (lifespan, error handlers), ``routes.py`` holds the endpoints,
``schemas.py`` their response models, ``queries.py`` the reads of the results DB, ``commands.py``
its writes, ``auth.py`` the per-DAG access checks through the api-server's auth manager and
``stream.py`` the Server-Sent Events of a running job. Nothing here is imported by the plugin
module until the api-server asks for the app.
"""

URL_PREFIX = "/training"
