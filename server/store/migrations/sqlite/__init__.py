"""Numbered SQL migrations, applied in order at start; each runs once per database."""
