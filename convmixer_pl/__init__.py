"""ConvMixer trained with PyTorch Lightning."""

from .model import VARIANTS, ConvMixer, create_model

__all__ = ["VARIANTS", "ConvMixer", "create_model"]
