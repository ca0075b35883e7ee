"""End-to-end tests on the docker-compose topology as native processes (``CeleryDeployment``)."""
