"""Task heads that sit on the two-stream encoder's pooled per-segment features."""
from .ave import AVEHead, ave_loss

__all__ = ["AVEHead", "ave_loss"]
from .avvp import AVVPHead, avvp_head_key_map, avvp_head_state_dict, avvp_loss

__all__ += ["AVVPHead", "avvp_loss", "avvp_head_key_map", "avvp_head_state_dict"]
