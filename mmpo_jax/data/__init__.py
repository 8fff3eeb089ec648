"""Preference data: formats, tokenizers, the grain pipeline, and the shipped demo dataset."""
