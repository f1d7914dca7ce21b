"""Whole-slide images: opening slides (OpenSlide, TiffSlide), the fast JPEG tile reader, the pyramidal
TIFF writer, tissue masks, tile grids and ROIs. Geometry and pixels; no model, no batch runner.
"""
