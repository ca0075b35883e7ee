"""Hooks: each talks to one system (the results database, a compute provider's API, storage)."""
