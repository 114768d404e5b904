"""The encoders: Swin-V2 block halves and weights files, HTS-AT front end and checkpoints."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from dgsct_kernels.models.encoders import (
    HTSAT,
    attention_half,
    build_swin_v2,
    htsat_state_dict_to_original,
    load_htsat_checkpoint,
    mlp_half,
    reshape_wav2img,
)
from dgsct_kernels.models.encoders.htsat import LogmelFilterBank, SpecAugment, Spectrogram

SWIN_TINY = {"img_size": 64, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
             "window_size": 4}
SWIN_NAME = "swinv2_tiny_window8_256"
HTSAT_TINY = {"sample_rate": 8000, "n_fft": 256, "hop_length": 80, "mel_bins": 16,
              "fmin": 50.0, "fmax": 3800.0, "spec_size": 64, "patch_size": 4, "embed_dim": 16,
              "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 4,
              "time_drop_width": 8, "freq_drop_width": 2}


def tiny_htsat(seed: int = 0, **kw) -> HTSAT:
    torch.manual_seed(seed)
    return HTSAT(**{**HTSAT_TINY, **kw})


# ----------------------------------------------------------------------------- Swin-V2

def test_swin_v2_halves_compose_to_the_block_exactly():
    torch.manual_seed(0)
    model = build_swin_v2(SWIN_NAME, **SWIN_TINY).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = model.patch_embed(image)
        for stage in model.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                y = mlp_half(block, attention_half(block, x))
                assert torch.equal(y, block(x))
                x = y
        assert torch.equal(model.norm(x), model.forward_features(image))


def test_swin_v2_halves_draw_drop_path_in_the_block_order():
    torch.manual_seed(0)
    model = build_swin_v2(SWIN_NAME, drop_path_rate=0.5, **SWIN_TINY).train()
    block = model.layers[1].blocks[1]
    x = torch.randn(4, 16, 16, 16)
    x = model.layers[1].downsample(x)
    torch.manual_seed(1)
    halves = mlp_half(block, attention_half(block, x))
    torch.manual_seed(1)
    assert torch.equal(halves, block(x))


def test_swin_v2_halves_refuse_bad_input():
    model = build_swin_v2(SWIN_NAME, **SWIN_TINY)
    block = model.layers[0].blocks[0]
    with pytest.raises(ValueError, match=r"attention_half: x has shape \(2, 256, 16\)"):
        attention_half(block, torch.randn(2, 256, 16))
    with pytest.raises(ValueError, match=r"mlp_half: x has shape .*expected C=16"):
        mlp_half(block, torch.randn(2, 16, 16, 8))
    with pytest.raises(ValueError, match=r"expected H, W = \(16, 16\)"):
        attention_half(block, torch.randn(2, 8, 8, 16))
    with pytest.raises(TypeError, match="SwinTransformerV2Block"):
        attention_half(torch.nn.Linear(16, 16), torch.randn(2, 16, 16, 16))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_build_swin_v2_loads_a_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    source = build_swin_v2(SWIN_NAME, **SWIN_TINY).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(source.state_dict(), str(path))
    torch.manual_seed(1)
    loaded = build_swin_v2(SWIN_NAME, weights=path, **SWIN_TINY).eval()
    report = loaded.weights_report
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["loaded"] == sorted(source.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), source.forward_features(x))


def test_build_swin_v2_ignores_a_classifier_and_refuses_partial_files(tmp_path):
    torch.manual_seed(0)
    with_head = build_swin_v2(SWIN_NAME, **SWIN_TINY)
    state = dict(with_head.state_dict())
    state["head.fc.weight"], state["head.fc.bias"] = torch.randn(10, 32), torch.randn(10)
    torch.save(state, tmp_path / "head.pth")
    report = build_swin_v2(SWIN_NAME, weights=tmp_path / "head.pth", **SWIN_TINY).weights_report
    assert report["ignored"] == ["head.fc.bias", "head.fc.weight"]

    missing = dict(with_head.state_dict())
    del missing["layers.1.blocks.0.mlp.fc1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match=r"missing keys \['layers.1.blocks.0.mlp.fc1.weight'\]"):
        build_swin_v2(SWIN_NAME, weights=tmp_path / "missing.pth", **SWIN_TINY)

    extra = dict(with_head.state_dict(), **{"adapter.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match=r"unexpected keys \['adapter.weight'\]"):
        build_swin_v2(SWIN_NAME, weights=tmp_path / "extra.pth", **SWIN_TINY)


def test_build_swin_v2_refuses_a_missing_file_and_bad_names(tmp_path):
    absent = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"weights=.*nope.pth.*no such file"):
        build_swin_v2(SWIN_NAME, weights=absent, **SWIN_TINY)
    with pytest.raises(ValueError, match="name='vit_base_patch16_224'"):
        build_swin_v2("vit_base_patch16_224")
    with pytest.raises(ValueError, match="num_classes=5"):
        build_swin_v2(SWIN_NAME, num_classes=5, **SWIN_TINY)


# ----------------------------------------------------------------------------- front end

def np_log_mel(wave, sr, n_fft, hop, n_mels, fmin, fmax):
    """HTS-AT's log-mel in numpy: rfft of reflect-padded periodic-Hann frames, Slaney mel."""
    n = np.arange(n_fft)
    window = 0.5 * (1 - np.cos(2 * np.pi * n / n_fft))
    padded = np.pad(wave, [(0, 0), (n_fft // 2, n_fft // 2)], mode="reflect")
    frames = 1 + (padded.shape[1] - n_fft) // hop
    idx = hop * np.arange(frames)[:, None] + n[None, :]
    power = np.abs(np.fft.rfft(padded[:, idx] * window, axis=-1)) ** 2   # [B, frames, bins]

    def hz_to_mel(f):  # Slaney: 3 bins per 200 Hz below 1 kHz, log spacing 6.4**(1/27) above
        return f * 3 / 200 if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)

    def mel_to_hz(m):
        return m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27)

    lo, hi = hz_to_mel(fmin), hz_to_mel(fmax)
    edges = [mel_to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    freqs = [sr / 2 * j / (n_fft // 2) for j in range(n_fft // 2 + 1)]
    mel = np.zeros((n_fft // 2 + 1, n_mels))
    for i in range(n_mels):
        a, b, c = edges[i], edges[i + 1], edges[i + 2]
        for j, f in enumerate(freqs):
            if a < f <= b:
                mel[j, i] = (f - a) / (b - a)
            elif b < f < c:
                mel[j, i] = (c - f) / (c - b)
        mel[:, i] *= 2 / (c - a)
    return 10 * np.log10(np.maximum(power @ mel, 1e-10))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_log_mel_matches_numpy_at_the_paper_settings(dtype, atol):
    rng = np.random.default_rng(0)
    wave = rng.standard_normal((2, 32000)) * np.linspace(0.1, 1, 32000)
    spec = Spectrogram(1024, 320, dtype=dtype)
    logmel = LogmelFilterBank(32000, 1024, 64, 50.0, 14000.0, dtype=dtype)
    assert tuple(spec.stft.conv_real.weight.shape) == (513, 1, 1024)
    assert tuple(logmel.melW.shape) == (513, 64)
    got = logmel(spec(torch.tensor(wave, dtype=dtype)))
    want = np_log_mel(wave, 32000, 1024, 320, 64, 50.0, 14000.0)
    assert got.shape == (2, 1, 101, 64)
    np.testing.assert_allclose(got[:, 0].double().numpy(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_htsat_log_mel_matches_numpy_on_a_small_config(dtype, atol):
    model = tiny_htsat(dtype=dtype)
    wave = np.random.default_rng(1).standard_normal((3, 4000))
    got = model.log_mel(torch.tensor(wave, dtype=dtype))
    want = np_log_mel(wave, 8000, 256, 80, 16, 50.0, 3800.0)
    np.testing.assert_allclose(got[:, 0].double().numpy(), want, rtol=0, atol=atol)
    assert not any(p.requires_grad for p in model.spectrogram_extractor.parameters())
    assert not model.logmel_extractor.melW.requires_grad


def test_htsat_log_mel_ignores_autocast():
    model = tiny_htsat()
    wave = torch.randn(2, 4000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.log_mel(wave)
    assert got.dtype == torch.float32 and torch.equal(got, model.log_mel(wave))


def test_reshape_wav2img_stacks_time_chunks_along_frequency():
    spec, ratio = 16, 4
    T, Fq = spec * ratio, spec // ratio
    t = torch.arange(T, dtype=torch.float64)[:, None]
    f = torch.arange(Fq, dtype=torch.float64)[None, :]
    x = (1000 * t + f).expand(2, 1, T, Fq)
    img = reshape_wav2img(x, spec, ratio)
    assert img.shape == (2, 1, spec, spec)
    chunk = T // ratio
    for k in range(ratio):
        for fi in range(Fq):
            for ti in (0, 5, chunk - 1):
                assert img[1, 0, k * Fq + fi, ti] == 1000 * (k * chunk + ti) + fi

    # shorter clips: time is resized (bicubic, corners kept), frequency untouched
    short = torch.randn(2, 1, 21, Fq, dtype=torch.float64)
    img = reshape_wav2img(short, spec, ratio)
    assert img.shape == (2, 1, spec, spec)
    assert torch.allclose(img[:, :, :Fq, 0], short[:, :, 0])
    assert torch.allclose(img[:, :, -Fq:, -1], short[:, :, -1])
    with pytest.raises(ValueError, match=r"x has shape \(1, 1, 65, 4\).*at most T=64"):
        reshape_wav2img(torch.zeros(1, 1, 65, Fq), spec, ratio)


def test_htsat_forward_gives_nhwc_tokens_and_frontend_an_image():
    model = tiny_htsat().eval()
    wave = torch.randn(3, 8000)  # 1 s: 101 frames, resized to 256
    with torch.no_grad():
        img = model.frontend(wave)
        tokens = model(wave)
    assert model.freq_ratio == 4 and img.shape == (3, 1, 64, 64)
    assert tokens.shape == (3, 2, 2, 128)
    assert torch.equal(tokens, model.trunk.forward_features(img))


def test_htsat_paper_config_structure():
    torch.manual_seed(0)
    model = HTSAT().eval()
    assert model.freq_ratio == 4 and model.target_frames == 1024
    assert tuple(model.logmel_extractor.melW.shape) == (513, 64)
    assert model.bn0.num_features == 64
    assert isinstance(model.trunk.layers[0].downsample, torch.nn.Identity)
    assert [len(s.blocks) for s in model.trunk.layers] == [2, 2, 6, 2]
    assert model.trunk.layers[3].blocks[1].attn_mask is None  # 8x8 = one window: no shift
    with torch.no_grad():
        tokens = model(torch.randn(1, 32000))
    assert tokens.shape == (1, 8, 8, 768)


def test_htsat_refuses_bad_input():
    model = tiny_htsat()
    with pytest.raises(ValueError, match=r"wave has shape \(8000,\): expected 2-D"):
        model(torch.randn(8000))
    with pytest.raises(TypeError, match=r"wave has dtype torch.float64: expected torch.float32"):
        model(torch.randn(2, 8000, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"wave has dtype torch.int16"):
        model(torch.zeros(2, 8000, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"wave has shape \(2, 100\): expected more than"):
        model(torch.randn(2, 100))
    with pytest.raises(ValueError, match=r"257 frames: expected at most 256 frames"):
        model(torch.randn(1, 256 * 80))
    model(torch.randn(1, 256 * 80 - 1))  # the longest clip that fits
    with pytest.raises(ValueError, match="spec_size=64, mel_bins=20"):
        HTSAT(**{**HTSAT_TINY, "mel_bins": 20})
    with pytest.raises(ValueError, match="fmax=5000"):
        HTSAT(**{**HTSAT_TINY, "fmax": 5000.0})


# ----------------------------------------------------------------------------- SpecAugment

def test_spec_augment_drops_stripes_in_training_only():
    torch.manual_seed(0)
    aug = SpecAugment(time_drop_width=64, time_stripes_num=2, freq_drop_width=8,
                      freq_stripes_num=2).train()
    x = torch.ones(64, 1, 40, 16)  # time axis shorter than the drop width: capped
    out = aug(x)
    assert out.shape == x.shape and (out == 0).any()
    for n in range(64):
        zero = out[n, 0] == 0
        rows, cols = zero.all(dim=1), zero.all(dim=0)
        assert torch.equal(zero, rows[:, None] | cols[None, :])  # only whole stripes
        assert int(cols.sum()) <= 2 * 7
    assert torch.equal(aug.eval()(x), x)


def test_htsat_spec_augment_is_switchable():
    wave = torch.randn(4, 8000)
    model = tiny_htsat().train()
    torch.manual_seed(1)
    a = model.frontend(wave)
    b = model.frontend(wave)
    assert not torch.equal(a, b)  # random stripes each call
    model.spec_augment = False
    assert torch.equal(model.frontend(wave), model.frontend(wave))
    off = tiny_htsat(spec_augment=False).train()
    assert off.spec_augment is False
    assert torch.equal(off.frontend(wave), off.frontend(wave))
    model.spec_augment = True
    model.eval()
    assert torch.equal(model.frontend(wave), model.frontend(wave))


# ----------------------------------------------------------------------------- checkpoints

def trained_tiny_htsat() -> HTSAT:
    model = tiny_htsat(seed=3).train()
    with torch.no_grad():  # move bn0's statistics away from their initial values
        model.frontend(torch.randn(4, 8000))
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def lightning_checkpoint(model: HTSAT) -> dict:
    state = htsat_state_dict_to_original(model)
    classes = 5
    state["sed_model.head.weight"] = torch.randn(classes, classes)
    state["sed_model.head.bias"] = torch.randn(classes)
    state["sed_model.tscam_conv.weight"] = torch.randn(classes, 128, 2, 3)
    state["sed_model.tscam_conv.bias"] = torch.randn(classes)
    return {"epoch": 7, "global_step": 70, "state_dict": state}


def test_htsat_original_key_layout():
    state = htsat_state_dict_to_original(tiny_htsat())
    assert all(k.startswith("sed_model.") for k in state)
    keys = {k[len("sed_model."):] for k in state}
    # the original downsamples at the end of stages 0..2, timm at the start of 1..3
    assert {f"layers.{i}.downsample.reduction.weight" for i in range(3)} <= keys
    assert not any(k.startswith("layers.3.downsample") for k in keys)
    assert {"spectrogram_extractor.stft.conv_real.weight", "logmel_extractor.melW",
            "bn0.running_mean", "patch_embed.proj.weight", "norm.weight",
            "layers.0.blocks.1.attn_mask",
            "layers.0.blocks.0.attn.relative_position_index"} <= keys
    assert not any(k.startswith("trunk.") for k in keys)


def test_htsat_checkpoint_round_trip(tmp_path):
    source = trained_tiny_htsat()
    path = tmp_path / "HTSAT_tiny.ckpt"
    torch.save(lightning_checkpoint(source), path)
    target = tiny_htsat(seed=9)
    report = load_htsat_checkpoint(target, path)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["loaded"] == sorted(target.state_dict())
    assert {"sed_model.head.weight", "sed_model.tscam_conv.bias",
            "sed_model.layers.0.blocks.1.attn_mask"} <= set(report["ignored"])
    assert report["renamed"]["sed_model.layers.0.downsample.reduction.weight"] == \
        "trunk.layers.1.downsample.reduction.weight"
    target.eval()
    wave = torch.randn(2, 6000)
    with torch.no_grad():
        assert torch.equal(target(wave), source(wave))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name

    # a bare original state dict (no Lightning wrapper, no prefix) loads the same way
    bare = {k[len("sed_model."):]: v for k, v in lightning_checkpoint(source)["state_dict"].items()}
    again = tiny_htsat(seed=5)
    load_htsat_checkpoint(again, bare)
    assert torch.equal(again.eval()(wave), target(wave))


def test_htsat_checkpoint_refuses_missing_unexpected_and_misshapen_keys(tmp_path):
    source = trained_tiny_htsat()
    target = tiny_htsat(seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    ckpt = lightning_checkpoint(source)
    del ckpt["state_dict"]["sed_model.layers.2.downsample.norm.weight"]
    with pytest.raises(RuntimeError,
                       match=r"missing keys \['trunk.layers.3.downsample.norm.weight'\]"):
        load_htsat_checkpoint(target, ckpt)

    ckpt = lightning_checkpoint(source)
    ckpt["state_dict"]["sed_model.absolute_pos_embed"] = torch.zeros(1, 256, 16)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['sed_model.absolute_pos_embed'\]"):
        load_htsat_checkpoint(target, ckpt)

    ckpt = lightning_checkpoint(source)
    ckpt["state_dict"]["sed_model.bn0.weight"] = torch.ones(64)
    with pytest.raises(RuntimeError, match=r"sed_model.bn0.weight has shape \(64,\)"):
        load_htsat_checkpoint(target, ckpt)

    other = tiny_htsat(window_size=2)  # same parameter shapes up to the bias tables
    with pytest.raises(RuntimeError, match="relative_position_bias_table"):
        load_htsat_checkpoint(other, lightning_checkpoint(source))

    path = tmp_path / "pickled.ckpt"  # Lightning hparams are often pickled objects
    torch.save({**lightning_checkpoint(source), "hparams": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(RuntimeError, match="trusted=True"):
        load_htsat_checkpoint(target, path)

    for name, value in target.state_dict().items():  # nothing was loaded in part
        assert torch.equal(before[name], value), name
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_htsat_checkpoint(target, tmp_path / "absent.ckpt")
    load_htsat_checkpoint(target, path, trusted=True)
    wave = torch.randn(1, 6000)
    with torch.no_grad():
        assert torch.equal(target.eval()(wave), source(wave))
