"""massrl: self-supervised visual pre-training with multiple augmentation strategies."""

__version__ = "0.1.0"
