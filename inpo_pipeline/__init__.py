"""inpo: DDIM-InPO preference alignment for text-to-image diffusion models."""

__version__ = "0.1.0"
