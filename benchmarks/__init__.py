"""Benchmarks: a zoo of backdoored and clean classifiers, this project's audit and purification
beside the baselines (FT, Neural Cleanse, CLP). Run ``python -m benchmarks.run --suite quick``."""
