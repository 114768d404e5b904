"""AVE head: the authors' parameter names, shapes, the loss and its gradients, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dgsct_kernels.data.ave import segment_accuracy
from dgsct_kernels.models.heads import AVEHead, ave_loss
from dgsct_kernels.models.heads.ave import clip_targets

TINY = {"visual_dim": 12, "audio_dim": 10, "num_classes": 5, "video_fc_dim": 16,
        "audio_fc_dim": 8, "d_model": 16, "num_heads": 4, "ff_dim": 32}


def _mha(d):
    return {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,),
            "out_proj.weight": (d, d), "out_proj.bias": (d,)}


def _prefixed(prefix, table):
    return {f"{prefix}.{k}": v for k, v in table.items()}


def _linear(name, n_in, n_out):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _norm(name, d):
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def _lstm(name, n_in, hidden):
    table = {}
    for suffix in ("", "_reverse"):
        table |= {f"{name}.weight_ih_l0{suffix}": (4 * hidden, n_in),
                  f"{name}.weight_hh_l0{suffix}": (4 * hidden, hidden),
                  f"{name}.bias_ih_l0{suffix}": (4 * hidden,),
                  f"{name}.bias_hh_l0{suffix}": (4 * hidden,)}
    return table


def authors_keys() -> dict[str, tuple[int, ...]]:
    """The `temporal_attn.*` and `CMBS.*` entries of the authors' AVE state dict, written from
    DG-SCT/AVE/nets/net_trans.py (TemporalAttention, CMBS and their parts) and CMBS's
    model/models.py (EncoderLayer, DecoderLayer, Encoder, Decoder): 192 keys."""
    d, ff = 256, 1024
    enc_layer = (_prefixed("self_attn", _mha(d)) | _linear("linear1", d, ff)
                 | _linear("linear2", ff, d) | _norm("norm1", d) | _norm("norm2", d))
    dec_layer = enc_layer | _prefixed("multihead_attn", _mha(d))

    def encoder(n_in):  # InternalTemporalRelationModule: prototype + 2 clones + affine
        return (_prefixed("encoder_layer", enc_layer) | _prefixed("encoder.layers.0", enc_layer)
                | _prefixed("encoder.layers.1", enc_layer) | _linear("affine_matrix", n_in, d))

    def decoder(n_in):  # CrossModalRelationAttModule: prototype + 1 clone + affine
        return (_prefixed("decoder_layer", dec_layer) | _prefixed("decoder.layers.0", dec_layer)
                | _linear("affine_matrix", n_in, d))

    temporal = (_linear("v_fc", 1536, 512) | _linear("a_fc", 768, 128)
                | _prefixed("video_encoder", encoder(512))
                | _prefixed("video_decoder", decoder(512))
                | _prefixed("audio_encoder", encoder(256))
                | _prefixed("audio_decoder", decoder(256))
                | _lstm("audio_visual_rnn_layer.audio_rnn", 128, 128)
                | _lstm("audio_visual_rnn_layer.visual_rnn", 512, 256)
                | _linear("audio_gated.0", d, 1) | _linear("video_gated.0", d, 1))
    inter = _prefixed("video_multihead", _mha(d)) | _norm("norm1", d)
    cmbs = (_prefixed("AVInter", inter) | _prefixed("VAInter", inter)
            | _linear("localize_module.classifier", d, 1)
            | _linear("localize_module.event_classifier", d, 28)
            | _norm("video_norm", d) | _norm("audio_norm", d)
            | _linear("audio_cas", d, 28) | _linear("video_cas", d, 28))
    return _prefixed("temporal_attn", temporal) | _prefixed("CMBS", cmbs)


def _labels(classes_per_video, num_classes=5):
    bg = num_classes
    return torch.stack([F.one_hot(torch.tensor([bg if c is None else c for c in row]),
                                  num_classes + 1).float() for row in classes_per_video])


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return AVEHead(**TINY)


def test_authors_key_set_and_shapes():
    head = AVEHead()
    expected = authors_keys()
    assert len(expected) == 192
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected)),
                                       sorted(set(expected) - set(got)))
    assert got == expected
    # an authors-style checkpoint (their keys, their shapes) loads strictly
    checkpoint = {k: torch.randn(shape) for k, shape in expected.items()}
    head.load_state_dict(checkpoint, strict=True)
    assert torch.equal(head.CMBS.video_cas.weight, checkpoint["CMBS.video_cas.weight"])


def test_paper_config_output_shapes():
    head = AVEHead().eval()
    out = head(torch.randn(2, 10, 1536), torch.randn(2, 10, 768))
    assert out["is_event"].shape == (2, 10) and out["gate"].shape == (2, 10)
    assert out["event"].shape == (2, 28) and out["av_score"].shape == (2, 28)


def test_tiny_output_shapes_and_gate_range(tiny):
    out = tiny(torch.randn(3, 7, 12), torch.randn(3, 7, 10))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "is_event": (3, 7), "event": (3, 5), "av_score": (3, 5), "gate": (3, 7)}
    assert torch.all((out["gate"] > 0) & (out["gate"] < 1))  # a product of two sigmoids
    tiny.eval()
    visual, audio = torch.randn(2, 10, 12), torch.randn(2, 10, 10)
    assert torch.equal(tiny(visual, audio)["event"], tiny(visual, audio)["event"])


def test_av_score_is_the_mean_of_top4_over_time(tiny):
    tiny.eval()
    visual, audio = torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    out = tiny.CMBS(visual, audio)

    def top4(cas):
        return cas.sort(dim=1, descending=True).values[:, :4].mean(1)

    expected = 0.5 * (top4(tiny.CMBS.video_cas(visual)) + top4(tiny.CMBS.audio_cas(audio)))
    torch.testing.assert_close(out["av_score"], expected)
    fused = 0.5 * (visual + audio)
    event = tiny.CMBS.localize_module.event_classifier(fused.max(1).values) + 0.3 * expected
    torch.testing.assert_close(out["event"], event)
    short = tiny.CMBS(visual[:, :3], audio[:, :3])  # T < topk: all segments
    assert short["av_score"].shape == (2, 5)


def test_loss_is_the_authors_sum_and_reaches_every_used_parameter(tiny):
    visual, audio = torch.randn(2, 10, 12), torch.randn(2, 10, 10)
    labels = _labels([[None, None, 3, 3, 3, None, None, None, None, None], [1] * 10])
    out = tiny(visual, audio)
    loss, logs = ave_loss(out, labels)
    assert torch.isfinite(loss) and set(logs) == {"is_event", "gate", "event", "av_score",
                                                  "total"}
    target = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0], [1] * 10], dtype=torch.float32)
    clip = torch.tensor([3, 1])
    expected = (F.binary_cross_entropy_with_logits(out["is_event"], target)
                + F.binary_cross_entropy_with_logits(out["gate"], target)  # as the authors
                + F.cross_entropy(out["event"], clip) + F.cross_entropy(out["av_score"], clip))
    torch.testing.assert_close(loss, expected)
    assert logs["total"] == pytest.approx(loss.item())
    loss.backward()
    unused = set(tiny.unused_parameter_names())
    for name, p in tiny.named_parameters():
        reached = p.grad is not None and p.grad.abs().sum() > 0
        assert reached == (name not in unused), name
    # the never-used ones are exactly the authors' dead modules
    prefixes = AVEHead.unused_parameter_prefixes()
    assert all(n.startswith(prefixes) or ".decoder.layers.0.self_attn." in n for n in unused)
    assert any(n.startswith("CMBS.AVInter.") for n in unused)


def test_gate_loss_on_probabilities(tiny):
    out = tiny(torch.randn(2, 10, 12), torch.randn(2, 10, 10))
    labels = _labels([[0] * 10, [None] * 10])
    _, logs = ave_loss(out, labels, gate_as_logits=False)
    target = torch.tensor([[1.0] * 10, [0.0] * 10])
    assert logs["gate"] == pytest.approx(F.binary_cross_entropy(out["gate"], target).item(),
                                         rel=1e-5)


def test_clip_targets_follow_the_authors():
    labels = _labels([[None, 2, 2, None, None, None, None, None, None, None], [None] * 10])
    is_event, clip = clip_targets(labels)
    assert is_event.tolist()[0] == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert clip.tolist() == [2, 0]  # an all-background clip counts as class 0 upstream


def test_shape_errors_name_the_argument(tiny):
    with pytest.raises(ValueError, match=r"visual: got shape \(2, 10, 11\), expected \[B, T, "
                                         r"12\]"):
        tiny(torch.randn(2, 10, 11), torch.randn(2, 10, 10))
    with pytest.raises(ValueError, match=r"audio: got shape \(20, 10\)"):
        tiny(torch.randn(2, 10, 12), torch.randn(20, 10))
    with pytest.raises(ValueError, match=r"expected the same B and T"):
        tiny(torch.randn(2, 10, 12), torch.randn(2, 9, 10))
    with pytest.raises(TypeError, match=r"visual: got dtype torch\.int64"):
        tiny(torch.ones(2, 10, 12, dtype=torch.long), torch.randn(2, 10, 10))
    out = tiny(torch.randn(2, 10, 12), torch.randn(2, 10, 10))
    with pytest.raises(ValueError, match=r"labels: got shape \(2, 10, 29\), expected \[B=2, "
                                         r"T=10, 6\]"):
        ave_loss(out, torch.zeros(2, 10, 29))
    with pytest.raises(ValueError, match=r"labels: got shape \(3, 10, 6\)"):
        ave_loss(out, torch.zeros(3, 10, 6))
    with pytest.raises(KeyError, match="missing 'gate'"):
        ave_loss({k: v for k, v in out.items() if k != "gate"}, torch.zeros(2, 10, 6))
    with pytest.raises(ValueError, match=r"d_model=18 must be even .* divisible by num_heads=4"):
        AVEHead(**(TINY | {"d_model": 18}))
    with pytest.raises(ValueError, match="topk=0"):
        AVEHead(**TINY, topk=0)


@pytest.fixture
def one_thread():
    # tiny ops gain nothing from threads, and OpenMP spin-waits crawl on a busy 2-core host
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_head_overfits_a_batch(one_thread):
    torch.manual_seed(1)
    head = AVEHead(**TINY)
    visual, audio = torch.randn(4, 10, 12), torch.randn(4, 10, 10)
    labels = _labels([[None, None, 0, 0, 0, 0, None, None, None, None],
                      [2] * 10,
                      [None] * 6 + [4] * 4,
                      [None, 1, 1, 1, 1, 1, 1, 1, None, None]])
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, logs = ave_loss(head(visual, audio), labels)
        first = first if first is not None else logs["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        out = head(visual, audio)
    assert logs["total"] < 0.5 * first
    assert segment_accuracy(out["is_event"], out["event"], labels) == 100.0
