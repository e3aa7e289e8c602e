"""Experiment configs (installed as the package `mirage_configs`): `get_config(arg)` per file."""
