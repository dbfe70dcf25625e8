"""clipkit: contrastive multimodal alignment — train, evaluate zero-shot, and retrieve."""

__version__ = "0.1.0"
