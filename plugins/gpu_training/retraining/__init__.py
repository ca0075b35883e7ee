"""Retraining: specs that become DAGs, champion promotion, multi-stage pipelines and sweeps."""
