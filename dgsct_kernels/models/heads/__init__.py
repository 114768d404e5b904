"""Task heads that sit on the two-stream encoder's pooled per-segment features."""
from .ave import AVEHead, ave_loss

__all__ = ["AVEHead", "ave_loss"]
