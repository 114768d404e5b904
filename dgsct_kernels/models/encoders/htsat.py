"""The audio encoder: HTS-AT (Chen et al., ICASSP 2022) as the DG-SCT authors use it.

HTS-AT is a log-mel front end followed by a Swin (v1) trunk. The trunk here is timm's
`SwinTransformer`, which computes the same function as the original HTS-AT Swin code
(same window attention, relative position bias, -100 shift mask, patch merging order).
The front end is written here in plain PyTorch (no torchaudio, torchlibrosa or librosa)
with the original module and parameter names, so HTS-AT checkpoints load:

    wave [B, samples] at 32 kHz
    -> spectrogram_extractor: STFT as two frozen Conv1d DFT kernels (stft.conv_real,
       stft.conv_imag), n_fft 1024, hop 320, periodic Hann, centred with reflect
       padding; power spectrum                                           [B, 1, T, n_fft/2+1]
    -> logmel_extractor: @ melW (Slaney mel, Slaney area norm, 50 Hz-14 kHz),
       10*log10(max(x, 1e-10))                                           [B, 1, T, 64]
    -> bn0: BatchNorm2d over the mel bins
    -> spec_augmenter: time and frequency stripe dropping, training only
    -> reshape_wav2img: bicubic resize of time to spec_size*freq_ratio frames, cut into
       freq_ratio chunks stacked along frequency                         [B, 1, 256, 256]
    -> trunk.forward_features: timm Swin, NHWC tokens                    [B, 8, 8, 768]

Checkpoints (`load_htsat_checkpoint`): an HTS-AT Lightning checkpoint keeps the model
under `state_dict` with keys prefixed `sed_model.`. The original trunk downsamples at
the END of a stage and timm at the START, so `layers.{i}.downsample.*` loads into
`trunk.layers.{i+1}.downsample.*`. Keys that an encoder has no use for are ignored and
listed in the report: the classifier (`head.*`, `tscam_conv.*`) and the buffers the
original saves but timm derives (`attn_mask`, `relative_position_index`; they are
checked against timm's before being dropped, which catches a window-size mismatch).

Deviations from the original HTS-AT forward (none changes the function on the paper's
inputs): mixup is not applied (the authors' AVE code passes no mixup lambda); a clip
longer than spec_size*freq_ratio frames (10.24 s at the defaults) is refused instead of
cropped at random; SpecAugment stripe widths are capped at the axis length (the
original raises there); and there is no classifier head, since the encoder returns
tokens.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HTSAT",
    "STFT",
    "LogmelFilterBank",
    "SpecAugment",
    "Spectrogram",
    "hann_dft_kernels",
    "htsat_state_dict_to_original",
    "load_htsat_checkpoint",
    "reshape_wav2img",
    "slaney_mel_filters",
]

CHECKPOINT_PREFIX = "sed_model."
# original HTS-AT keys an encoder does not use (its AudioSet/ESC classifier)
IGNORED_PREFIXES = ("head.", "tscam_conv.")
# buffers the original saves but timm derives (non-persistent there)
DERIVED_SUFFIXES = (".attn_mask", ".attn.relative_position_index")


# ----------------------------------------------------------------------------- front end

def hann_dft_kernels(n_fft: int, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Real and imaginary DFT rows times a periodic Hann window, [n_fft//2+1, 1, n_fft].

    Row k holds cos(2 pi k n / N) w[n] and -sin(2 pi k n / N) w[n] (the sign of
    exp(-i...)), as the original's frozen Conv1d kernels. Computed in float64.
    """
    n = torch.arange(n_fft, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)  # periodic ("fftbins") Hann
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    # reduce k*n modulo N first so large products keep full precision
    angle = 2 * math.pi * torch.remainder(k[:, None] * n[None, :], n_fft) / n_fft
    real = torch.cos(angle) * window
    imag = -torch.sin(angle) * window
    return real[:, None, :].to(dtype), imag[:, None, :].to(dtype)


def _hz_to_slaney_mel(hz: Tensor) -> Tensor:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above
    f_sp, min_log_hz, min_log_mel = 200.0 / 3, 1000.0, 15.0
    logstep = math.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_mel + torch.log(torch.clamp(hz, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, linear)


def _slaney_mel_to_hz(mel: Tensor) -> Tensor:
    f_sp, min_log_hz, min_log_mel = 200.0 / 3, 1000.0, 15.0
    logstep = math.log(6.4) / 27.0
    linear = f_sp * mel
    log = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log, linear)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                       dtype=torch.float32) -> Tensor:
    """Triangular mel filters on the Slaney scale with Slaney area norm, [n_fft//2+1, n_mels].

    The filters of librosa.filters.mel(htk=False, norm='slaney'), transposed as the
    original `melW`. Computed in float64, then cast.
    """
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = _hz_to_slaney_mel(torch.tensor([float(fmin), float(fmax)], dtype=torch.float64))
    edges = _slaney_mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2,
                                             dtype=torch.float64))
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - left) / (centre - left)
    falling = (right - bins[None, :]) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights = weights * (2.0 / (right - left))  # equal area per filter
    return weights.T.contiguous().to(dtype)


class STFT(nn.Module):
    """Centred, reflect-padded STFT as two frozen Conv1d kernels (the original's names)."""

    def __init__(self, n_fft: int, hop_length: int, dtype=None) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False, dtype=dtype)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False, dtype=dtype)
        real, imag = hann_dft_kernels(n_fft, dtype=self.conv_real.weight.dtype)
        with torch.no_grad():
            self.conv_real.weight.copy_(real)
            self.conv_imag.weight.copy_(imag)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """wave [B, samples] -> real, imag [B, 1, frames, n_fft//2+1]."""
        pad = self.n_fft // 2
        x = F.pad(wave[:, None, :], (pad, pad), mode="reflect")
        real = self.conv_real(x).transpose(1, 2)[:, None]
        imag = self.conv_imag(x).transpose(1, 2)[:, None]
        return real, imag


class Spectrogram(nn.Module):
    """Power spectrogram [B, 1, frames, n_fft//2+1]; frames = samples // hop + 1."""

    def __init__(self, n_fft: int, hop_length: int, dtype=None) -> None:
        super().__init__()
        self.stft = STFT(n_fft, hop_length, dtype=dtype)

    def forward(self, wave: Tensor) -> Tensor:
        real, imag = self.stft(wave)
        return real * real + imag * imag


class LogmelFilterBank(nn.Module):
    """`10*log10(max(power @ melW, amin))` with a frozen Slaney mel matrix `melW`."""

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                 amin: float = 1e-10, dtype=None) -> None:
        super().__init__()
        self.amin = amin
        dtype = dtype or torch.get_default_dtype()
        self.melW = nn.Parameter(slaney_mel_filters(sample_rate, n_fft, n_mels, fmin, fmax,
                                                    dtype=dtype), requires_grad=False)

    def forward(self, power: Tensor) -> Tensor:
        mel = torch.matmul(power, self.melW)
        # ref = 1.0 and no top_db in HTS-AT, so no offset and no clipping
        return 10.0 * torch.log10(torch.clamp(mel, min=self.amin))


def _stripes_kept(x: Tensor, dim: int, drop_width: int, stripes: int) -> Tensor:
    """A [B, length] mask that is False on `stripes` random stripes per sample.

    Each stripe has a width drawn from [0, drop_width) and a start drawn from
    [0, length - width), as the original; widths are capped at length - 1 so that a
    short axis is still valid (the original raises there).
    """
    batch, length = x.shape[0], x.shape[dim]
    width_cap = max(1, min(drop_width, length))
    widths = torch.randint(0, width_cap, (batch, stripes), device=x.device)
    starts = (torch.rand(batch, stripes, device=x.device) * (length - widths)).long()
    pos = torch.arange(length, device=x.device)
    inside = (pos >= starts[..., None]) & (pos < (starts + widths)[..., None])
    return ~inside.any(dim=1)


class SpecAugment(nn.Module):
    """HTS-AT's SpecAugment: zero random time and frequency stripes, in training only.

    Input [B, 1, time, freq]. Defaults are the original's (2 time stripes up to 64 frames,
    2 frequency stripes up to 8 bins). Vectorised over the batch (no host sync).
    """

    def __init__(self, time_drop_width: int = 64, time_stripes_num: int = 2,
                 freq_drop_width: int = 8, freq_stripes_num: int = 2) -> None:
        super().__init__()
        self.time_drop_width, self.time_stripes_num = time_drop_width, time_stripes_num
        self.freq_drop_width, self.freq_stripes_num = freq_drop_width, freq_stripes_num

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep_t = _stripes_kept(x, 2, self.time_drop_width, self.time_stripes_num)
        keep_f = _stripes_kept(x, 3, self.freq_drop_width, self.freq_stripes_num)
        keep = keep_t[:, None, :, None] & keep_f[:, None, None, :]
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return (f"time_drop_width={self.time_drop_width}, time_stripes_num="
                f"{self.time_stripes_num}, freq_drop_width={self.freq_drop_width}, "
                f"freq_stripes_num={self.freq_stripes_num}")


def reshape_wav2img(x: Tensor, spec_size: int, freq_ratio: int) -> Tensor:
    """[B, C, T, F] log-mel -> [B, C, freq_ratio*F', T'/freq_ratio] image (HTS-AT's layout).

    Time is resized (bicubic, align_corners=True) up to T' = spec_size*freq_ratio frames
    and frequency up to F' = spec_size // freq_ratio bins when shorter, then time is cut
    into freq_ratio consecutive chunks stacked along frequency: image row k*F' + f,
    column t holds bin f of frame k*T'/freq_ratio + t.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"reshape_wav2img: x has shape {shape}: expected [B, C, T, F]")
    B, C, T, Fq = x.shape
    target_t, target_f = spec_size * freq_ratio, spec_size // freq_ratio
    if T > target_t or Fq > target_f:
        raise ValueError(f"reshape_wav2img: x has shape {tuple(x.shape)}: expected at most "
                         f"T={target_t} frames and F={target_f} bins (spec_size={spec_size}, "
                         f"freq_ratio={freq_ratio}); cut longer clips before the encoder")
    if T < target_t:
        x = F.interpolate(x, (target_t, Fq), mode="bicubic", align_corners=True)
    if Fq < target_f:
        x = F.interpolate(x, (target_t, target_f), mode="bicubic", align_corners=True)
    chunk = target_t // freq_ratio
    x = x.reshape(B, C, freq_ratio, chunk, target_f)           # time -> (chunk k, t)
    x = x.permute(0, 1, 2, 4, 3)                               # [B, C, k, F, t]
    return x.reshape(B, C, freq_ratio * target_f, chunk)


# ----------------------------------------------------------------------------- model

class HTSAT(nn.Module):
    """HTS-AT as an encoder: `forward(wave [B, samples]) -> NHWC tokens [B, H, W, C]`.

    The defaults are the AudioSet HTS-AT the DG-SCT authors load (32 kHz, 64 mel bins,
    256x256 image, Swin-T-like trunk with window 8, embed 96, drop path 0.1). Small
    configurations work as long as spec_size is a multiple of mel_bins (freq_ratio =
    spec_size // mel_bins) and of patch_size.

    Sub-modules keep the original names: `spectrogram_extractor.stft.conv_real/conv_imag`,
    `logmel_extractor.melW`, `bn0`, `spec_augmenter`; the Swin is `trunk` (timm
    `SwinTransformer`, NHWC, downsample at stage start). SpecAugment runs only in
    training and only while `self.spec_augment` is True (switch it with the constructor
    argument or the attribute). Like the authors, callers may keep the encoder in train
    mode, in which case SpecAugment, drop path and bn0's statistics are all live.
    """

    def __init__(self, sample_rate: int = 32000, n_fft: int = 1024, hop_length: int = 320,
                 mel_bins: int = 64, fmin: float = 50.0, fmax: float = 14000.0,
                 spec_size: int = 256, patch_size: int = 4, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (4, 8, 16, 32),
                 window_size: int = 8, spec_augment: bool = True, drop_path_rate: float = 0.1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, amin: float = 1e-10,
                 time_drop_width: int = 64, time_stripes_num: int = 2,
                 freq_drop_width: int = 8, freq_stripes_num: int = 2, dtype=None) -> None:
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        for name, value in (("sample_rate", sample_rate), ("n_fft", n_fft),
                            ("hop_length", hop_length), ("mel_bins", mel_bins),
                            ("spec_size", spec_size), ("patch_size", patch_size),
                            ("embed_dim", embed_dim), ("window_size", window_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HTSAT: {name}={value!r}: expected a positive integer")
        if n_fft < 2:
            raise ValueError(f"HTSAT: n_fft={n_fft}: expected at least 2")
        if not 0 <= fmin < fmax <= sample_rate / 2:
            raise ValueError(f"HTSAT: fmin={fmin}, fmax={fmax}: expected 0 <= fmin < fmax <= "
                             f"sample_rate/2 = {sample_rate / 2}")
        if spec_size % mel_bins:
            raise ValueError(f"HTSAT: spec_size={spec_size}, mel_bins={mel_bins}: expected "
                             "spec_size to be a multiple of mel_bins (freq_ratio = "
                             "spec_size // mel_bins chunks of mel_bins rows fill the image)")
        if spec_size % patch_size:
            raise ValueError(f"HTSAT: spec_size={spec_size}, patch_size={patch_size}: expected "
                             "spec_size to be a multiple of patch_size")
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"HTSAT: depths={depths}, num_heads={num_heads}: expected two "
                             "non-empty sequences of the same length (one entry per stage)")

        self.sample_rate, self.n_fft, self.hop_length = sample_rate, n_fft, hop_length
        self.mel_bins, self.spec_size = mel_bins, spec_size
        self.freq_ratio = spec_size // mel_bins
        self.target_frames = spec_size * self.freq_ratio
        self.spec_augment = bool(spec_augment)

        self.spectrogram_extractor = Spectrogram(n_fft, hop_length, dtype=dtype)
        self.logmel_extractor = LogmelFilterBank(sample_rate, n_fft, mel_bins, fmin, fmax,
                                                 amin=amin, dtype=dtype)
        self.spec_augmenter = SpecAugment(time_drop_width, time_stripes_num,
                                          freq_drop_width, freq_stripes_num)
        self.bn0 = nn.BatchNorm2d(mel_bins, dtype=dtype)
        self.trunk = SwinTransformer(
            img_size=spec_size, patch_size=patch_size, in_chans=1, num_classes=0,
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, dtype=dtype)
        self.num_features = self.trunk.num_features

    # -- front end
    def _check_wave(self, wave) -> None:
        if not isinstance(wave, Tensor):
            raise TypeError(f"HTSAT: wave is {type(wave).__name__}: expected a Tensor "
                            "[B, samples]")
        if wave.dim() != 2:
            raise ValueError(f"HTSAT: wave has shape {tuple(wave.shape)}: expected 2-D "
                             "[B, samples] (mono waveforms)")
        weight = self.spectrogram_extractor.stft.conv_real.weight
        if wave.dtype != weight.dtype:
            raise TypeError(f"HTSAT: wave has dtype {wave.dtype}: expected {weight.dtype}, "
                            "the front end's dtype")
        if wave.device != weight.device:
            raise ValueError(f"HTSAT: wave is on {wave.device}: expected {weight.device}")
        samples = wave.shape[1]
        if samples <= self.n_fft // 2:
            raise ValueError(f"HTSAT: wave has shape {tuple(wave.shape)}: expected more than "
                             f"n_fft//2 = {self.n_fft // 2} samples (reflect padding)")
        frames = samples // self.hop_length + 1
        if frames > self.target_frames:
            max_samples = self.target_frames * self.hop_length - 1
            raise ValueError(f"HTSAT: wave has shape {tuple(wave.shape)}, {frames} frames: "
                             f"expected at most {self.target_frames} frames "
                             f"({max_samples} samples at hop {self.hop_length}); cut the clip")

    def log_mel(self, wave: Tensor) -> Tensor:
        """wave [B, samples] -> log-mel [B, 1, frames, mel_bins], before bn0."""
        self._check_wave(wave)
        # a low-precision STFT and log would be far off, so autocast never reaches them
        with torch.autocast(wave.device.type, enabled=False):
            return self.logmel_extractor(self.spectrogram_extractor(wave))

    def reshape_wav2img(self, x: Tensor) -> Tensor:
        """[B, 1, frames, mel_bins] -> [B, 1, spec_size, spec_size] (see `reshape_wav2img`)."""
        return reshape_wav2img(x, self.spec_size, self.freq_ratio)

    def frontend(self, wave: Tensor) -> Tensor:
        """wave [B, samples] -> image [B, 1, spec_size, spec_size]."""
        x = self.log_mel(wave)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over the mel bins
        if self.training and self.spec_augment:
            x = self.spec_augmenter(x)
        return self.reshape_wav2img(x)

    def forward(self, wave: Tensor) -> Tensor:
        """wave [B, samples] -> tokens [B, H, W, C] after the trunk's final norm."""
        return self.trunk.forward_features(self.frontend(wave))

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, "
                f"hop_length={self.hop_length}, mel_bins={self.mel_bins}, "
                f"spec_size={self.spec_size}, freq_ratio={self.freq_ratio}, "
                f"spec_augment={self.spec_augment}")


# ----------------------------------------------------------------------------- checkpoints

def _original_to_ours(key: str, num_stages: int) -> str | None:
    """Map an original HTS-AT key (no `sed_model.` prefix) to ours; None if unknown."""
    if key.startswith(("spectrogram_extractor.", "logmel_extractor.", "bn0.")):
        return key
    if key.startswith(("patch_embed.", "norm.")):
        return "trunk." + key
    if key.startswith("layers."):
        parts = key.split(".")
        if len(parts) < 4 or not parts[1].isdigit():
            return None
        stage = int(parts[1])
        if parts[2] == "blocks":
            return "trunk." + key
        if parts[2] == "downsample" and stage + 1 < num_stages:
            # the original downsamples at the end of stage i, timm at the start of i+1
            return "trunk." + ".".join(["layers", str(stage + 1)] + parts[2:])
    return None


def _ours_to_original(key: str) -> str:
    if not key.startswith("trunk."):
        return key
    key = key[len("trunk."):]
    parts = key.split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
        return ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
    return key


def _derived_buffers(model: HTSAT) -> dict[str, Tensor]:
    """The buffers the original saves and timm derives, under their original key names."""
    out = {}
    for s, stage in enumerate(model.trunk.layers):
        for b, block in enumerate(stage.blocks):
            base = f"layers.{s}.blocks.{b}"
            out[f"{base}.attn.relative_position_index"] = block.attn.relative_position_index
            if block.attn_mask is not None:
                out[f"{base}.attn_mask"] = block.attn_mask
    return out


def htsat_state_dict_to_original(model: HTSAT) -> dict[str, Tensor]:
    """Our state dict in the original HTS-AT Lightning layout: `sed_model.` + original key.

    Downsample keys move back one stage, and the derived buffers (`attn_mask`,
    `attn.relative_position_index`) are included, as the original saves them. There is
    no classifier (`head`, `tscam_conv`): add one to mimic a full checkpoint.
    """
    out = {CHECKPOINT_PREFIX + _ours_to_original(k): v
           for k, v in model.state_dict().items()}
    out.update({CHECKPOINT_PREFIX + k: v for k, v in _derived_buffers(model).items()})
    return out


def _read_checkpoint(path, trusted: bool) -> Mapping:
    if isinstance(path, Mapping):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_htsat_checkpoint: path={path!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # pickled non-tensor objects in a Lightning checkpoint
        if trusted:
            raise
        raise RuntimeError(f"load_htsat_checkpoint: {path!r} does not load with "
                           f"torch.load(weights_only=True) ({err}). If you trust the file, "
                           "pass trusted=True to unpickle it in full.") from err


def load_htsat_checkpoint(model: HTSAT, path, *, trusted: bool = False) -> dict:
    """Load an HTS-AT checkpoint into `model`, all or nothing; return the report.

    `path` is a Lightning checkpoint (`{"state_dict": {"sed_model.<key>": ...}}`), a bare
    original state dict, or such a dict already in memory. The report has `loaded` (our
    keys), `missing` and `unexpected` (always empty on return: any of them raises
    `RuntimeError` naming them, before the model is touched), `ignored` (original keys
    not used by the encoder: the classifier `head.*`/`tscam_conv.*` and the derived
    buffers, which are first checked against timm's) and `renamed` (original -> ours,
    for the shifted downsample keys). `trusted=True` unpickles non-tensor objects.
    """
    if not isinstance(model, HTSAT):
        raise TypeError(f"load_htsat_checkpoint: model is {type(model).__name__}: "
                        "expected HTSAT")
    ckpt = _read_checkpoint(path, trusted)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping):
        raise TypeError(f"load_htsat_checkpoint: the checkpoint's state dict is "
                        f"{type(state).__name__}: expected a mapping of tensors")
    prefixed = any(k.startswith(CHECKPOINT_PREFIX) for k in state)

    num_stages = len(model.trunk.layers)
    derived = _derived_buffers(model)
    ours_state = model.state_dict()
    mapped: dict[str, Tensor] = {}
    ignored, unexpected, renamed, mismatched = [], [], {}, []
    wrong_shape: set[str] = set()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            mismatched.append(f"{key} is {type(value).__name__}, not a tensor")
            continue
        if prefixed:
            if not key.startswith(CHECKPOINT_PREFIX):
                unexpected.append(key)
                continue
            orig = key[len(CHECKPOINT_PREFIX):]
        else:
            orig = key
        if orig.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if orig.endswith(DERIVED_SUFFIXES):
            ours = derived.get(orig)
            if ours is None:
                unexpected.append(key)
            elif (tuple(value.shape) != tuple(ours.shape)
                  or not torch.equal(value.to(ours.device, ours.dtype), ours)):
                mismatched.append(f"{key} (differs from timm's derived buffer)")
            else:
                ignored.append(key)
            continue
        target = _original_to_ours(orig, num_stages)
        if target is None or target not in ours_state:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(ours_state[target].shape):
            mismatched.append(f"{key} has shape {tuple(value.shape)}, {target} "
                              f"{tuple(ours_state[target].shape)}")
            wrong_shape.add(target)
            continue
        if target != "trunk." + orig and target != orig:
            renamed[key] = target
        mapped[target] = value

    missing = sorted(set(ours_state) - set(mapped) - wrong_shape)
    if missing or unexpected or mismatched:
        where = repr(os.fspath(path)) if not isinstance(path, Mapping) else "the checkpoint"
        raise RuntimeError(f"load_htsat_checkpoint: {where} does not fit this HTSAT: "
                           f"missing keys {missing}, unexpected keys {sorted(unexpected)}"
                           + (f", mismatched {mismatched} (a different configuration?)"
                              if mismatched else ""))
    # every key and shape was checked above, so this cannot load in part
    model.load_state_dict(mapped, strict=True)
    return {"loaded": sorted(mapped), "missing": [], "unexpected": [],
            "ignored": sorted(ignored), "renamed": renamed}
