"""Checkpoints of the model layer: the authors' DG-SCT task checkpoint format, the
trainable-part safetensors file, and strictness (every missing/unexpected key named,
nothing copied on failure)."""
from __future__ import annotations

import pytest
import torch

from dgsct_kernels.models import (
    CheckpointError,
    build_dgsct,
    load_authors_checkpoint,
    load_trainable,
    save_trainable,
    trainable_state_dict,
)
from dgsct_kernels.models.checkpoints import authors_key_map
from dgsct_kernels.models.encoders.htsat import htsat_state_dict_to_original
from dgsct_kernels.module import TEMPORAL_GATE_KEYS
from _support import randomised_tiny_ave_model


@pytest.fixture(scope="module")
def source():
    return randomised_tiny_ave_model(seed=10)


@pytest.fixture
def target():
    torch.manual_seed(11)
    return build_dgsct("ave", "tiny", backend="reference")


def authors_checkpoint(model, with_temporal_gate=False):
    """The model's trainable part under the authors' key names, as their AVE model saves it:
    no temporal_gated layer, plus their encoder and unused keys."""
    state = trainable_state_dict(model)
    out = {}
    for ours, theirs in authors_key_map(model).items():
        if not with_temporal_gate and theirs.split(".", 2)[2] in TEMPORAL_GATE_KEYS:
            continue
        out[theirs] = state[ours].clone()
    out["swin.patch_embed.proj.weight"] = torch.zeros(1)
    out["htsat.patch_embed.proj.weight"] = torch.zeros(1)
    out["adapter_token_downsampler.0.weight"] = torch.zeros(2, 2)
    return out


def _assert_trainable_equal(a, b, skip=()):
    sa, sb = trainable_state_dict(a), trainable_state_dict(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.endswith(skip):
            assert torch.equal(sa[key], sb[key]), key


def test_authors_key_format(source):
    ckpt = authors_checkpoint(source)
    # names as the authors' MMIL_Net registers them (their nets/net_trans.py)
    for key in ("audio_adapter_blocks_p1.0.conv_adapter.weight",
                "vis_adapter_blocks_p1.0.my_tokens", "vis_adapter_blocks_p2.7.bn2.running_var",
                "audio_adapter_blocks_p2.7.ln_post.bias", "vis_adapter_blocks_p1.3.gate_av",
                "temporal_attn.v_fc.weight",
                "temporal_attn.audio_visual_rnn_layer.audio_rnn.weight_ih_l0",
                "temporal_attn.video_encoder.encoder.layers.1.self_attn.in_proj_weight",
                "CMBS.localize_module.event_classifier.weight",
                "CMBS.AVInter.video_multihead.in_proj_weight",
                "htsat.bn0.running_mean", "htsat.bn0.running_var",
                "htsat.bn0.num_batches_tracked"):
        assert key in ckpt, key
    n_modules = len(source.encoder.adapter_modules())
    assert len({".".join(k.split(".")[:2]) for k in ckpt if "_adapter_blocks_" in k}) == n_modules
    assert not any(".temporal_gated." in k for k in ckpt)


def test_authors_checkpoint_round_trip(source, target, tmp_path):
    initial_gate = {k: v.clone() for k, v in trainable_state_dict(target).items()
                    if ".temporal_gated." in k}
    path = tmp_path / "authors_ave.pt"
    torch.save(authors_checkpoint(source), path)
    report = load_authors_checkpoint(target, path)
    _assert_trainable_equal(source, target, skip=TEMPORAL_GATE_KEYS)
    after = trainable_state_dict(target)
    for key, value in initial_gate.items():  # gamma=0 modules keep their own gate layer
        assert torch.equal(after[key], value), key
    assert len(report.initial_temporal_gate) == len(target.encoder.adapter_modules())
    assert report.skipped["encoder (swin.*, htsat.*)"] == ["swin.patch_embed.proj.weight",
                                                           "htsat.patch_embed.proj.weight"]
    assert report.skipped["unused by the authors' forward"] == [
        "adapter_token_downsampler.0.weight"]

    # with a temporal_gated layer (a gamma != 0 checkpoint) it loads too
    fresh = build_dgsct("ave", "tiny")
    load_authors_checkpoint(fresh, authors_checkpoint(source, with_temporal_gate=True))
    _assert_trainable_equal(source, fresh)


def test_authors_checkpoint_through_build_dgsct(source, tmp_path):
    path = tmp_path / "authors_ave.pth"
    torch.save({"state_dict": authors_checkpoint(source)}, path)  # wrapped also loads
    model = build_dgsct("ave", "tiny", weights={"dgsct": path})
    _assert_trainable_equal(source, model, skip=TEMPORAL_GATE_KEYS)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("vis_adapter_blocks_p2.3.fc.bias"),
     ["missing keys (1)", "vis_adapter_blocks_p2.3.fc.bias"]),
    (lambda c: c.pop("CMBS.video_cas.weight"), ["missing keys (1)", "CMBS.video_cas.weight"]),
    (lambda c: c.pop("htsat.bn0.running_var"), ["missing keys (1)", "htsat.bn0.running_var"]),
    (lambda c: c.__setitem__("vis_adapter_blocks_p1.99.fc.bias", torch.zeros(3)),
     ["unexpected keys (1)", "vis_adapter_blocks_p1.99.fc.bias"]),
    (lambda c: c.__setitem__("mlp_class.weight", torch.zeros(3)),
     ["unexpected keys (1)", "mlp_class.weight"]),
    (lambda c: c.__setitem__("audio_adapter_blocks_p1.0.temporal_gated.0.bias", torch.zeros(1)),
     ["unexpected keys (1)", "audio_adapter_blocks_p1.0.temporal_gated.0.bias"]),
    (lambda c: c.__setitem__("vis_adapter_blocks_p1.0.fc.weight", torch.zeros(4, 4)),
     ["shape mismatches (1)", "vis_adapter_blocks_p1.0.fc.weight", "(4, 4)"]),
])
def test_authors_checkpoint_refuses_partial_loads(source, target, edit, words):
    ckpt = authors_checkpoint(source)
    edit(ckpt)
    before = {k: v.clone() for k, v in trainable_state_dict(target).items()}
    with pytest.raises(CheckpointError) as err:
        load_authors_checkpoint(target, ckpt)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    for key, value in trainable_state_dict(target).items():  # nothing was copied
        assert torch.equal(value, before[key]), key


def test_authors_checkpoint_with_encoders(source, target):
    ckpt = authors_checkpoint(source)
    ckpt = {k: v for k, v in ckpt.items() if not k.startswith(("swin.", "htsat."))}
    ckpt.update({"swin." + k: v for k, v in source.encoder.visual.state_dict().items()})
    ckpt.update({"htsat." + k[len("sed_model."):]: v
                 for k, v in htsat_state_dict_to_original(source.encoder.audio).items()})
    with torch.no_grad():  # make the target's encoders differ first
        for p in target.encoder.visual.parameters():
            p.add_(1.0)
    load_authors_checkpoint(target, ckpt, encoders=True)
    for (key, a), b in zip(source.encoder.visual.state_dict().items(),
                           target.encoder.visual.state_dict().values()):
        assert torch.equal(a, b), key
    without = {k: v for k, v in authors_checkpoint(source).items()
               if not k.endswith("patch_embed.proj.weight")}  # only bn0 statistics left
    with pytest.raises(CheckpointError, match="no swin"):
        load_authors_checkpoint(target, without, encoders=True)


def test_trainable_part_round_trip(source, target, tmp_path):
    # the encoders' BatchNorm statistics (HTS-AT bn0) change in train mode, so they are saved
    stats = {"encoder.audio.bn0.running_mean", "encoder.audio.bn0.running_var",
             "encoder.audio.bn0.num_batches_tracked"}
    assert stats <= set(trainable_state_dict(source))
    path = tmp_path / "trainable.safetensors"
    save_trainable(source, path, {"note": "test"})
    load_trainable(target, path)
    _assert_trainable_equal(source, target)
    # through build_dgsct, and the same outputs (encoders are built from a fixed seed)
    rebuilt = build_dgsct("ave", "tiny", weights=path, backend="reference")
    frames = torch.randn(1, 10, 3, 64, 64)
    audio = 0.1 * torch.randn(1, 10, 32000)
    source.eval()
    rebuilt.eval()
    with torch.no_grad():
        a, b = source(frames=frames, audio=audio), rebuilt(frames=frames, audio=audio)
    torch.testing.assert_close(a["event"], b["event"], rtol=0, atol=0)
    torch.testing.assert_close(a["is_event"], b["is_event"], rtol=0, atol=0)


def test_trainable_part_is_strict(source, target, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trainable_state_dict(source).items()}
    partial = dict(state)
    partial.pop("encoder.vis_adapter_blocks_p1.0.gate")
    with pytest.raises(CheckpointError, match="encoder.vis_adapter_blocks_p1.0.gate"):
        load_trainable(target, partial)
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.extra"):
        load_trainable(target, dict(state, **{"encoder.extra": torch.zeros(1)}))
    plain = tmp_path / "plain.safetensors"
    save_file(state, plain)  # no format metadata: not from save_trainable
    with pytest.raises(CheckpointError, match="metadata format None"):
        load_trainable(target, plain)
    with pytest.raises(CheckpointError, match="without the metadata"):
        build_dgsct("ave", "tiny", weights=plain)
