"""Evaluation suites."""
