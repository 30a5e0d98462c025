"""Deployable flows: the demo, table enrichment and rerun of failed items (see prefect.yaml)."""
