"""Scoring edits (Reliability, Generalization, Locality, Portability) and analysing updates."""
