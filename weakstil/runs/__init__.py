"""Batch orchestration: the per-slide jobs (extract, score, regenerate), the one runner (skip, lock,
run, record) and the executors (local, Dask).
"""
