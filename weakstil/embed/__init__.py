"""Tiles to embeddings: the encoder registry and weight sources, extraction, the shared-memory
reader ring, and the Zarr feature cache.
"""
