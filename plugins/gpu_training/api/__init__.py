"""The results REST API: a FastAPI app the plugin mounts on Airflow's api-server under ``/training``.

``app.py`` builds the app (lifespan, error handlers), ``routes.py`` holds the endpoints,
``schemas.py`` their response models, ``queries.py`` the reads of the results DB, ``commands.py``
its writes, ``auth.py`` authentication (first, before the results DB is opened), the per-DAG access
checks through the api-server's auth manager and the ``Origin`` check of a cookie's cancel,
``output_files.py`` the ``file://`` outputs it serves (only regular files inside the job's outputs
folder) and ``stream.py`` the Server-Sent Events of a running job. Nothing here is imported by the plugin
module until the api-server asks for the app.
"""

URL_PREFIX = "/training"
