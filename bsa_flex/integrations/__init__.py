"""Integrations of BSA into model libraries (each one an optional extra)."""
