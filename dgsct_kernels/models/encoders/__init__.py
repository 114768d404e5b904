"""The frozen encoders DG-SCT adapts: timm Swin-V2 (vision) and HTS-AT (audio)."""
from .htsat import HTSAT, htsat_state_dict_to_original, load_htsat_checkpoint, reshape_wav2img
from .swin_v2 import attention_half, build_swin_v2, mlp_half

__all__ = [
    "HTSAT",
    "attention_half",
    "build_swin_v2",
    "htsat_state_dict_to_original",
    "load_htsat_checkpoint",
    "mlp_half",
    "reshape_wav2img",
]
