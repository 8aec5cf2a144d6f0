"""Evaluation: group and per-site metrics with intervals, and the report files."""
