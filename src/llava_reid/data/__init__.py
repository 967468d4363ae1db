"""Datasets in the Interactive-PEDES format: loading, synthesis, transforms."""

# The dataset splits, in order (a dependency-free module: the Snakefile imports it).
SPLITS = ("train", "val", "test")
