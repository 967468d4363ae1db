"""LLaVA-ReID: interactive text-to-image person re-identification as a workflow of artifacts."""

__version__ = "0.1.0"
