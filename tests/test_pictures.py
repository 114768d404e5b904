"""python/plot_tsne.py and python/plot_attention.py on the tiny AVE model and a small synthetic
set (CPU, Agg), and the DG-SCT-off context they use."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from dgsct_kernels.models import build_dgsct  # noqa: E402
from dgsct_kernels.models.two_stream import tile_waveform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ["--synthetic-videos", "0,0,3", "--threads", "1"]  # 3 test clips, written once


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))


def _check_png(path: Path, min_kb: float = 10):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_kb * 1024


def _open_gates(model, gate=0.5, gate_av=0.3):
    with torch.no_grad():
        for m in model.encoder.adapter_modules():
            m.gate.fill_(gate)
            m.gate_av.fill_(gate_av)


def test_tsne_main_writes_png(env, tmp_path, capsys):
    plot_tsne = _load("plot_tsne")
    out = tmp_path / "pics" / "tsne.png"
    with pytest.warns(UserWarning, match="untrained"):
        result = plot_tsne.main(SMALL + ["--out", str(out), "--dpi", "50"])
    _check_png(out)
    assert result["clips"] == 3 and result["points"] >= 5
    printed = capsys.readouterr().out
    assert "took " in printed and str(out) in printed


def test_tsne_with_weights_and_palette(env, tmp_path):
    """--weights loads a saved trainable part; --colors writes a palette PNG."""
    from dgsct_kernels.models import save_trainable
    plot_tsne = _load("plot_tsne")
    torch.manual_seed(0)
    model = build_dgsct("ave", "tiny")
    _open_gates(model)
    weights = tmp_path / "w.safetensors"
    save_trainable(model, weights)
    out = tmp_path / "tsne.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "untrained" warning
        plot_tsne.main(SMALL + ["--weights", str(weights), "--out", str(out), "--dpi", "40",
                                "--colors", "64", "--max-clips", "2"])
    _check_png(out, min_kb=2)
    from PIL import Image
    with Image.open(out) as image:
        assert image.mode == "P"


def test_attention_main_writes_png(env, tmp_path, capsys):
    plot_attention = _load("plot_attention")
    out = tmp_path / "attention.png"
    with pytest.warns(UserWarning, match="untrained"):
        result = plot_attention.main(SMALL + ["--video", "2", "--out", str(out), "--dpi", "50"])
    _check_png(out)
    assert result["segments"] == 10 and 0 <= result["correct"] <= 10
    assert "took " in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, message", [
    ("plot_tsne", ["--task", "nope"], "unknown; known tasks"),
    ("plot_tsne", ["--task", "avvp"], "not supported by the pictures"),
    ("plot_tsne", ["--weights", "/no/such.safetensors"], "--weights"),
    ("plot_tsne", ["--data-root", "/no/such/dir"], "--data-root"),
    ("plot_tsne", ["--split", "bogus"], "--split 'bogus'"),
    ("plot_tsne", ["--synthetic-videos", "1,2"], "--synthetic-videos"),
    ("plot_tsne", ["--colors", "1"], "--colors"),
    ("plot_attention", ["--video", "99"], "--video 99"),
    ("plot_attention", ["--alpha", "2"], "--alpha"),
])
def test_bad_arguments_name_the_argument(env, capsys, script, argv, message):
    module = _load(script)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(SystemExit) as err:
            module.main(SMALL + argv)
    assert err.value.code == 2
    err_text = capsys.readouterr().err
    assert message in err_text, err_text


def test_dgsct_off_restores_gates_and_switches_modules_off():
    plot_tsne = _load("plot_tsne")
    torch.manual_seed(0)
    model = build_dgsct("ave", "tiny", backend="reference").eval()
    _open_gates(model)
    modules = model.encoder.adapter_modules()
    before = [(m.gate.detach().clone(), m.gate_av.detach().clone()) for m in modules]
    inputs = model.example_inputs(batch=1, seed=3)
    with torch.no_grad():
        on = model(**inputs)["features"]
        with plot_tsne.dgsct_off(model):
            assert all(float(m.gate) == 0 and float(m.gate_av) == 0 for m in modules)
            off = model(**inputs)["features"]
            frames = inputs["frames"].flatten(0, 1)
            waves = inputs["audio"].flatten(0, 1)
            enc = model.encoder
            got = enc(frames, waves)
            want_v = enc.visual.forward_features(frames)
            img = enc.audio.frontend(tile_waveform(waves, model.preset.clip_samples))
            want_a = enc.audio.trunk.layers(enc.audio.trunk.patch_embed(img))
        again = model(**inputs)["features"]
    # off: the encoders' outputs are the plain encoders'
    assert torch.equal(got.visual, want_v) and torch.equal(got.audio, want_a)
    for name in ("visual", "audio"):
        assert not torch.allclose(on[name], off[name])
        assert torch.equal(on[name], again[name])
    for m, (gate, gate_av) in zip(modules, before):
        assert torch.equal(m.gate, gate) and torch.equal(m.gate_av, gate_av)
        assert m.gate.requires_grad


def test_dgsct_off_restores_after_an_error():
    plot_tsne = _load("plot_tsne")
    model = build_dgsct("ave", "tiny", backend="reference")
    _open_gates(model, gate=0.25)
    with pytest.raises(RuntimeError, match="boom"):
        with plot_tsne.dgsct_off(model):
            raise RuntimeError("boom")
    assert all(float(m.gate.detach()) == 0.25 for m in model.encoder.adapter_modules())
    with pytest.raises(ValueError, match="no FusedDGSCT"):
        with plot_tsne.dgsct_off(torch.nn.Linear(2, 2)):
            pass
