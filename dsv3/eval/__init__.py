"""Evaluation: perplexity, passkey retrieval, task accuracy, expert-load statistics."""
