"""Batch orchestration: the per-slide jobs (``jobs``: extract, score, regenerate), the one runner
(``runner``: skip, lock, run, record), the executors (``executors``: local, Dask) and the batch
functions the command line calls (``batch``: extract_slides, score_slides, regenerate).
"""
