"""What a trained model writes: tile predictions and slide scores, the results/ folder contract,
heatmap PNG, overlay TIFF, GeoJSON and the review bundle. Never imports lightning or the runner.
"""
