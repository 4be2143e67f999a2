"""Sealing: the hot table's oldest events rewritten into an immutable partition file."""
