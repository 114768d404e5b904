"""The two-stream model: block pairing from depths, injection order, freezing, identity at
initialisation, presets, build_dgsct and input errors (tiny config, CPU)."""
from __future__ import annotations

import pytest
import torch

from dgsct_kernels import FusedDGSCT
from dgsct_kernels.models import TASKS, build_dgsct, count_modules, pair_blocks, two_stream
from dgsct_kernels.models.presets import PAPER, TINY, with_overrides
from dgsct_kernels.models.two_stream import StageShape, paired_blocks, tile_waveform

B = 1  # clips per test batch (F = B * 10 frames)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_dgsct("ave", "tiny", backend="reference")


def _inputs(model, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, n = model.image_size, model.segment_samples
    frames = torch.randn(b, 10, 3, s, s, generator=g)
    audio = 0.1 * torch.randn(b, 10, n, generator=g)
    return frames, audio


def _open_gates(model, gate=0.5, gate_av=0.3):
    with torch.no_grad():
        for m in model.encoder.adapter_modules():
            m.gate.fill_(gate)
            m.gate_av.fill_(gate_av)


# ---------------------------------------------------------------------------- pairing


def test_paper_pairing_and_module_count_from_depths():
    visual, audio = PAPER_DEPTHS = (2, 2, 18, 2), (2, 2, 6, 2)
    assert count_modules(*PAPER_DEPTHS) == 48
    stages = pair_blocks(visual, audio)
    assert [s.partners for s in stages[:2]] == [(0, 1), (0, 1)]
    assert stages[3].partners == (0, 1)
    paired = [j for j, k in enumerate(stages[2].partners) if k is not None]
    assert paired == [3 * k + 2 for k in range(6)] == [2, 5, 8, 11, 14, 17]
    assert [stages[2].partners[j] for j in paired] == list(range(6))


def test_pairing_rule_is_general():
    assert pair_blocks((4,), (2,))[0].partners == (None, 0, None, 1)
    assert pair_blocks((3, 1), (3, 1))[0].partners == (0, 1, 2)
    assert count_modules((2, 2, 6, 2), (2, 2, 2, 2)) == 4 * 8
    with pytest.raises(ValueError, match="not a multiple"):
        pair_blocks((2, 5), (2, 2))
    with pytest.raises(ValueError, match="visual depth 2 is not a multiple of audio depth 4"):
        pair_blocks((2,), (4,))
    with pytest.raises(ValueError, match="same number of stages"):
        pair_blocks((2, 2, 2), (2, 2))


def test_paper_module_shapes_match_spec_table():
    # Swin-V2-L at 192 px (patch 4, embed 192) and HTS-AT (256 px image, patch 4, embed 96)
    visual = [StageShape(d, (48 >> i, 48 >> i), 192 << i) for i, d in enumerate((2, 2, 18, 2))]
    audio = [StageShape(d, (64 >> i, 64 >> i), 96 << i) for i, d in enumerate((2, 2, 6, 2))]
    blocks = paired_blocks(visual, audio)
    assert len(blocks) == 12
    per_stage = {(b.stage, b.visual.tokens, b.visual.dim, b.audio.tokens, b.audio.dim)
                 for b in blocks}
    assert per_stage == {(0, 2304, 192, 4096, 96), (1, 576, 384, 1024, 192),
                         (2, 144, 768, 256, 384), (3, 36, 1536, 64, 768)}
    assert [b.visual_block for b in blocks if b.stage == 2] == [2, 5, 8, 11, 14, 17]


def test_tiny_model_modules(model):
    enc = model.encoder
    depths_v = tuple(s.depth for s in enc.visual_stages)
    depths_a = tuple(s.depth for s in enc.audio_stages)
    assert depths_v != depths_a  # a mismatched stage exercises the r*k + r - 1 rule
    modules = enc.adapter_modules()
    assert len(modules) == count_modules(depths_v, depths_a) == 32
    assert all(isinstance(m, FusedDGSCT) for m in modules)
    ave = TASKS["ave"]
    for m in modules:
        assert (m.alpha, m.beta, m.gamma) == (ave.alpha, ave.beta, ave.gamma) == (0.3, 0.05, 0.0)
        assert m.dims.num_latents == 32 and m.dims.hidden == m.dims.dim // 8
        assert m.segments == 10 and m.backend == "reference"
    for p in enc.paired:  # visual module: x = visual tokens, g = audio tokens; audio reversed
        v, a = enc.vis_adapter_blocks_p1[p.index].dims, enc.audio_adapter_blocks_p2[p.index].dims
        assert (v.tokens, v.dim, v.guide_tokens, v.guide_dim) == (
            p.visual.tokens, p.visual.dim, p.audio.tokens, p.audio.dim)
        assert (a.tokens, a.dim, a.guide_tokens, a.guide_dim) == (
            p.audio.tokens, p.audio.dim, p.visual.tokens, p.visual.dim)


def test_task_presets_follow_spec_table():
    table = {"ave": (0.3, 0.05, 0, 32, 8), "avvp": (0.3, 0.05, 0, 32, 8),
             "avs_s4": (0.3, 0.05, 0, 32, 8), "avs_ms3": (0.2, 0.1, 0, 32, 2),
             "avqa": (0.3, 0.05, 0, 2, 8), "pretrain": (0.3, 0.01, 0.05, 2, 8)}
    for task, row in table.items():
        t = TASKS[task]
        assert (t.alpha, t.beta, t.gamma, t.num_latents, t.reduction) == row, task
    assert TASKS["avs_s4"].segments == TASKS["avs_ms3"].segments == 5
    assert TASKS["ave"].gate_weight == 0.1 and not TASKS["avqa"].temporal_attention
    assert PAPER.visual["name"] == "swinv2_large_window12_192" and PAPER.image_size == 192
    assert PAPER.clip_samples == 10 * PAPER.segment_samples == 320000
    assert TINY.visual["depths"] != TINY.audio["depths"]


# ---------------------------------------------------------------------------- order and flow


def test_call_order_of_halves_blocks_and_modules(model, monkeypatch):
    calls = []
    enc = model.encoder

    def record(tag, fn):
        def wrapped(block, x):
            calls.append(f"{tag} {block._where}")
            return fn(block, x)
        return wrapped

    monkeypatch.setattr(two_stream, "attention_half", record("v-attn", two_stream.attention_half))
    monkeypatch.setattr(two_stream, "mlp_half", record("v-mlp", two_stream.mlp_half))
    handles = []
    for s, stage in enumerate(enc.visual.layers):
        for j, blk in enumerate(stage.blocks):
            blk._where = f"{s}.{j}"
            handles.append(blk.register_forward_pre_hook(
                lambda m, a, w=f"{s}.{j}": calls.append(f"v-block {w}")))
    for s, stage in enumerate(enc.audio.trunk.layers):
        for k, blk in enumerate(stage.blocks):
            handles.append(blk.register_forward_pre_hook(
                lambda m, a, w=f"{s}.{k}": calls.append(f"a-block {w}")))
    for name in two_stream.ADAPTER_LISTS:
        for i, m in enumerate(getattr(enc, name)):
            handles.append(m.register_forward_pre_hook(
                lambda m, a, w=f"{name}[{i}]": calls.append(w)))
    try:
        model.eval()
        with torch.no_grad():
            model(*_inputs(model))
    finally:
        for h in handles:
            h.remove()
        for stage in enc.visual.layers:
            for blk in stage.blocks:
                del blk._where

    # tiny: visual depths (2, 2, 6, 2), audio (2, 2, 2, 2); in stage 2 audio k -> visual 3k+2
    partners = [(0, 1), (0, 1), (None, None, 0, None, None, 1), (0, 1)]
    expected, i = [], 0
    for s, stage in enumerate(partners):
        for j, k in enumerate(stage):
            if k is None:
                expected.append(f"v-block {s}.{j}")
                continue
            expected += [f"audio_adapter_blocks_p1[{i}]", f"vis_adapter_blocks_p1[{i}]",
                         f"v-attn {s}.{j}", f"a-block {s}.{k}",
                         f"audio_adapter_blocks_p2[{i}]", f"vis_adapter_blocks_p2[{i}]",
                         f"v-mlp {s}.{j}"]
            i += 1
    assert calls == expected


def _spec_forward(model, frames, audio):
    """The injection order written out from SPEC.md / the issue, for comparison."""
    from dgsct_kernels.models.encoders.swin_v2 import attention_half, mlp_half

    enc = model.encoder
    tok = lambda t: t.reshape(t.shape[0], -1, t.shape[-1])
    waves = tile_waveform(audio.flatten(0, 1), 320000)
    v = enc.visual.patch_embed(frames.flatten(0, 1))
    a = enc.audio.trunk.patch_embed(enc.audio.frontend(waves))
    i = 0
    partners = [(0, 1), (0, 1), (None, None, 0, None, None, 1), (0, 1)]
    for vs, as_, stage in zip(enc.visual.layers, enc.audio.trunk.layers, partners):
        v, a = vs.downsample(v), as_.downsample(a)
        for blk, k in zip(vs.blocks, stage):
            if k is None:
                v = blk(v)
                continue
            ra = enc.audio_adapter_blocks_p1[i](tok(a), tok(v)).residual  # both read the
            rv = enc.vis_adapter_blocks_p1[i](tok(v), tok(a)).residual  # streams before
            v = attention_half(blk, v) + rv.view(v.shape)
            a = as_.blocks[k](a) + ra.view(a.shape)
            oa = enc.audio_adapter_blocks_p2[i](tok(a), tok(v))
            ov = enc.vis_adapter_blocks_p2[i](tok(v), tok(a))
            v = mlp_half(blk, v) + ov.residual.view(v.shape)
            a = a + oa.residual.view(a.shape)
            i += 1
    v = enc.visual.norm(v)
    pooled_v = torch.bmm(ov.spatial_map.unsqueeze(1), tok(v)).squeeze(1)
    pooled_a = torch.bmm(oa.spatial_map.unsqueeze(1), tok(a)).squeeze(1)
    return pooled_v.view(frames.shape[0], 10, -1), pooled_a.view(frames.shape[0], 10, -1)


def test_data_flow_matches_the_spec_order():
    torch.manual_seed(1)
    model = build_dgsct("ave", "tiny", backend="reference")
    _open_gates(model)  # residuals nonzero, so the order of adds is visible
    model.eval()
    frames, audio = _inputs(model, b=1, seed=3)
    with torch.no_grad():
        out = model(frames=frames, audio=audio)
        want_v, want_a = _spec_forward(model, frames, audio)
    torch.testing.assert_close(out["features"]["visual"], want_v, rtol=0, atol=0)
    torch.testing.assert_close(out["features"]["audio"], want_a, rtol=0, atol=0)
    assert out["features"]["visual"].abs().sum() > 0


def test_zero_gates_give_timm_forward_features(model):
    model.eval()
    enc = model.encoder
    assert all(float(m.gate.detach()) == 0 for m in enc.adapter_modules())  # their initial value
    frames, audio = _inputs(model, b=1, seed=5)
    frames, waves = frames.flatten(0, 1), audio.flatten(0, 1)
    with torch.no_grad():
        out = enc(frames, waves)
        want_v = enc.visual.forward_features(frames)
        img = enc.audio.frontend(tile_waveform(waves, 320000))
        want_a = enc.audio.trunk.layers(enc.audio.trunk.patch_embed(img))  # no final norm
    assert torch.equal(out.visual, want_v)
    assert torch.equal(out.audio, want_a)


# ---------------------------------------------------------------------------- training


def test_only_dgsct_and_head_train_and_gradients_reach_first_modules():
    torch.manual_seed(2)
    model = build_dgsct("ave", "tiny", backend="reference")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    allowed = tuple(f"encoder.{name}." for name in two_stream.ADAPTER_LISTS) + ("head.",)
    assert trainable and all(n.startswith(allowed) for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("encoder.visual.", "encoder.audio.")) for n in frozen)
    assert not any(p.requires_grad for p in model.encoder.visual.parameters())
    assert not any(p.requires_grad for p in model.encoder.audio.parameters())

    model.train()
    frames, audio = _inputs(model, b=1, seed=7)
    out = model(frames=frames, audio=audio)
    (out["is_event"].sum() + out["event"].sum()).backward()
    enc = model.encoder
    # at initialisation (gate 0) the gates of the first modules still get a gradient
    assert float(enc.vis_adapter_blocks_p1[0].gate.grad.abs()) > 0
    assert float(enc.audio_adapter_blocks_p1[0].gate.grad.abs()) > 0
    assert all(p.grad is None for p in enc.visual.parameters())

    model.zero_grad(set_to_none=True)
    _open_gates(model)
    out = model(frames=frames, audio=audio)
    (out["is_event"].sum() + out["event"].sum()).backward()
    for m in (enc.vis_adapter_blocks_p1[0], enc.audio_adapter_blocks_p1[0]):
        for name in ("conv_adapter.weight", "fc.weight", "down_sampler.weight", "my_tokens"):
            grad = dict(m.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_encoders_train_mode_default_and_eval_switch(model):
    model.train()
    assert model.encoder.visual.training and model.encoder.audio.training
    assert model.encoder.audio.spec_augment
    model.eval()
    kept = build_dgsct("ave", "tiny", encoders_eval=True)
    kept.train()
    assert not kept.encoder.visual.training and not kept.encoder.audio.training
    assert all(m.training for m in kept.encoder.adapter_modules()) and kept.head.training


def test_encoders_are_reproducible_and_backend_passes_through():
    a = build_dgsct("ave", "tiny", backend="reference")
    b = build_dgsct("ave", "tiny", backend="auto")
    for (name, pa), pb in zip(a.encoder.visual.state_dict().items(),
                              b.encoder.visual.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert {m.backend for m in b.encoder.adapter_modules()} == {"auto"}


def test_custom_preset_pairs_by_its_own_depths():
    spec = with_overrides("tiny", visual={"depths": (2, 2, 4, 2)})
    assert spec.visual["embed_dim"] == TINY.visual["embed_dim"]  # dicts are merged
    model = build_dgsct("ave", spec)
    assert [p.visual_block for p in model.encoder.paired if p.stage == 2] == [1, 3]
    assert len(model.encoder.adapter_modules()) == count_modules((2, 2, 4, 2), (2, 2, 2, 2))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change, kind, words", [
    (lambda f, a: (f[0], a), ValueError, ["frames", "(10, 3, 64, 64)", "[B, T=10, 3, 64, 64]"]),
    (lambda f, a: (f[:, :5], a[:, :5]), ValueError, ["frames", "T=10"]),
    (lambda f, a: (f[..., :32, :32], a), ValueError, ["frames", "(1, 10, 3, 32, 32)"]),
    (lambda f, a: (f, a[..., :16000]), ValueError, ["audio", "(1, 10, 16000)", "32000"]),
    (lambda f, a: (f, a[:, :9]), ValueError, ["audio", "T=10"]),
    (lambda f, a: (f, torch.cat([a, a])), ValueError, ["audio", "B=2", "B=1"]),
    (lambda f, a: (f, (a * 100).long()), TypeError, ["audio", "torch.int64", "floating"]),
    (lambda f, a: (f.numpy(), a), TypeError, ["frames", "ndarray"]),
    (lambda f, a: (f, a.double()), TypeError, ["frames dtype torch.float32", "torch.float64"]),
])
def test_bad_inputs_name_argument_shape_and_expectation(model, change, kind, words):
    frames, audio = change(*_inputs(model))
    with pytest.raises(kind) as err:
        model(frames=frames, audio=audio)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_build_dgsct_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="task='nope'"):
        build_dgsct("nope", "tiny")
    with pytest.raises(ValueError, match="preset='huge'"):
        build_dgsct("ave", "huge")
    with pytest.raises(NotImplementedError, match="avqa"):
        build_dgsct("avqa", "tiny")
    with pytest.raises(ValueError, match="unknown keys \\['vision'\\]"):
        build_dgsct("ave", "tiny", weights={"vision": "x"})
    with pytest.raises(FileNotFoundError, match="weights\\['dgsct'\\]"):
        build_dgsct("ave", "tiny", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="backend"):
        build_dgsct("ave", "tiny", backend="gpu-magic")


def test_readme_task_names_are_the_code_names():
    """Every `task="..."` the README shows is a key of TASKS, and every task is shown."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = set(re.findall(r'task="(\w+)"', readme))
    assert shown == set(TASKS), f"README shows {sorted(shown)}, TASKS has {sorted(TASKS)}"
