"""Scoring tables and exporting the local model."""
