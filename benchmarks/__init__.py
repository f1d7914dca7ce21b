"""weakstil's benchmark suite: ``python -m benchmarks run [--device cpu|cuda] [--quick|--smoke] [--out FILE]``.

Every figure is measured in the same run as its reference and reported both as a rate and as a
ratio to that reference (these machines are shared and noisy; ratios travel, absolute numbers only
count on a known machine). Cases, one module each:

* ``bench_read``    — Read: tiles/s of weakstil's reader vs the naive one-``read_region``-per-tile
  loop (CLAM/TRIDENT style, OpenSlide) vs the decode bound (imagecodecs on the TIFF's own JPEG
  tiles, plus the resize where the level needs one).
* ``bench_extract`` — Extract: end-to-end tiles/s (``weakstil.embed.extract.embed_tiles`` into the
  feature cache) vs the encoder alone on preloaded tiles; pipeline efficiency = their ratio.
* ``bench_cache``   — Cache: write and read MB/s, time to load one 20,000-tile bag.
* ``bench_train``   — Train: 5-fold CV time over bag counts (near-linear?); Score: per-slide latency.
* ``bench_memory``  — Memory: peak RSS of extracting one large slide, in a subprocess.

Results go to a JSON file and a markdown table (see docs/performance.md).
"""
