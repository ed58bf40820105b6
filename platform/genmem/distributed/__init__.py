"""Ray: training on Ray Train workers, sampling as Ray tasks. The only package (with
tracking.py) that imports Ray; the library below it runs without a cluster."""
