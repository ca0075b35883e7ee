"""Hosts: the work directory and trainer process of a running instance."""
