"""Attention capture: a registered transformers attention function that streams what it sees."""
