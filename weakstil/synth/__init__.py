"""Synthetic H&E cohorts with known per-tile truth (the demo, the tests, the accuracy benchmark).
"""
