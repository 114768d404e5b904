"""AVE localisation head: temporal attention, then a CMBS-style localiser.

This is the head of the DG-SCT authors' AVE model (temporal attention over pooled per-segment
features, then the "Cross-Modal Background Suppression" localiser). It is written from scratch.
Submodules and parameters keep the authors' names, so the `temporal_attn.*` and `CMBS.*` keys
of their checkpoint load into `AVEHead` unchanged (`strict=True`).

The authors' module registers some parameters that its forward never uses: the prototype
layers kept next to their clones (`*.encoder_layer.*`, `*.decoder_layer.*`), the decoder's
self-attention (`*.decoder.layers.N.self_attn.*`), `CMBS.AVInter`, `CMBS.VAInter`,
`CMBS.video_norm` and `CMBS.audio_norm`. They are registered here too, so the key sets match,
and skipped in `forward` (the authors compute AVInter/VAInter and discard the result).
`AVEHead.unused_parameter_names()` lists them.

Layout: batch first, `[B, T, C]`. The authors run sequence first; the maths is the same.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CMBS", "AVEHead", "TemporalAttention", "ave_loss", "clip_targets"]


def _check(name: str, t: object, rank: int, last: int | None, expected: str) -> None:
    """A head input: a floating Tensor of `rank` dims (and last size `last`), or an error
    naming it, its shape or dtype, and `expected`."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor {expected}, got {type(t).__name__}")
    if t.dim() != rank or (last is not None and t.shape[-1] != last):
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {expected}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: got dtype {t.dtype}, expected a floating dtype")


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (self-attention, ReLU feed-forward)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class DecoderLayer(nn.Module):
    """Cross-modal decoder layer: the query attends to [memory, query] concatenated in time.

    `self_attn` exists only for the authors' key set; their forward never calls it.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                    batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        memory = torch.cat([memory, query], dim=1)
        attended = self.multihead_attn(query, memory, memory, need_weights=False)[0]
        x = self.norm1(query + self.dropout1(attended))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class _Stack(nn.Module):
    """`layers.N` clones of one layer (the authors' Encoder/Decoder containers)."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])

    def forward(self, x: Tensor, *memory: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, *memory)
        return x


class TemporalEncoder(nn.Module):
    """Linear projection to d_model, then a stack of self-attention layers over time."""

    def __init__(self, input_dim: int, d_model: int, nhead: int, dim_feedforward: int,
                 num_layers: int, dropout: float):
        super().__init__()
        # the prototype stays registered (unused) because the authors' checkpoint holds it
        self.encoder_layer = EncoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.encoder = _Stack(self.encoder_layer, num_layers)
        self.affine_matrix = nn.Linear(input_dim, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.affine_matrix(x))


class CrossModalDecoder(nn.Module):
    """Linear projection of the query to d_model, then cross-modal decoder layers."""

    def __init__(self, input_dim: int, d_model: int, nhead: int, dim_feedforward: int,
                 num_layers: int, dropout: float):
        super().__init__()
        self.decoder_layer = DecoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.decoder = _Stack(self.decoder_layer, num_layers)
        self.affine_matrix = nn.Linear(input_dim, d_model)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        return self.decoder(self.affine_matrix(query), memory)


class RNNEncoder(nn.Module):
    """Bidirectional LSTMs: audio to d_model (d_model/2 each way), visual to 2*d_model."""

    def __init__(self, audio_dim: int, video_dim: int, d_model: int, num_layers: int):
        super().__init__()
        # LSTM dropout only acts between layers; the authors' 0.2 with one layer is a no-op
        dropout = 0.2 if num_layers > 1 else 0.0
        self.audio_rnn = nn.LSTM(audio_dim, d_model // 2, num_layers=num_layers,
                                 batch_first=True, bidirectional=True, dropout=dropout)
        self.visual_rnn = nn.LSTM(video_dim, d_model, num_layers=num_layers, batch_first=True,
                                  bidirectional=True, dropout=dropout)

    def forward(self, audio: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        return self.audio_rnn(audio)[0], self.visual_rnn(visual)[0]


class AudioVideoInter(nn.Module):
    """Registered for the authors' key set only (`CMBS.AVInter`/`VAInter`); never called."""

    def __init__(self, d_model: int, nhead: int, head_dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(0.1)
        self.video_multihead = nn.MultiheadAttention(d_model, nhead, dropout=head_dropout,
                                                     batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)


class SupvLocalizeModule(nn.Module):
    """Per-segment is-event logit and a clip class from the time-max of the features."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(d_model, 1)
        self.event_classifier = nn.Linear(d_model, num_classes)

    def forward(self, fused: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier(fused).squeeze(-1), self.event_classifier(fused.amax(dim=1))


class TemporalAttention(nn.Module):
    """Per-segment features -> gated cross-modal features ([B, T, d_model] each) and the
    audio-visual gate (a probability, [B, T])."""

    def __init__(self, visual_dim: int = 1536, audio_dim: int = 768, *, video_fc_dim: int = 512,
                 audio_fc_dim: int = 128, d_model: int = 256, num_heads: int = 4,
                 ff_dim: int = 1024, encoder_layers: int = 2, decoder_layers: int = 1,
                 rnn_layers: int = 1, gate_weight: float = 0.1, dropout: float = 0.2,
                 attn_dropout: float = 0.1):
        super().__init__()
        self.gate_weight = gate_weight
        self.v_fc = nn.Linear(visual_dim, video_fc_dim)
        self.a_fc = nn.Linear(audio_dim, audio_fc_dim)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        layer = {"d_model": d_model, "nhead": num_heads, "dim_feedforward": ff_dim,
                 "dropout": attn_dropout}
        visual_rnn_dim, audio_rnn_dim = 2 * d_model, 2 * (d_model // 2)
        self.video_encoder = TemporalEncoder(visual_rnn_dim, num_layers=encoder_layers, **layer)
        self.video_decoder = CrossModalDecoder(visual_rnn_dim, num_layers=decoder_layers, **layer)
        self.audio_encoder = TemporalEncoder(audio_rnn_dim, num_layers=encoder_layers, **layer)
        self.audio_decoder = CrossModalDecoder(audio_rnn_dim, num_layers=decoder_layers, **layer)
        self.audio_visual_rnn_layer = RNNEncoder(audio_fc_dim, video_fc_dim, d_model, rnn_layers)
        self.audio_gated = nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid())

    def forward(self, visual: Tensor, audio: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        audio = self.a_fc(audio)  # the authors apply no activation on the audio side
        visual = self.dropout(self.relu(self.v_fc(visual)))
        audio_seq, visual_seq = self.audio_visual_rnn_layer(audio, visual)

        video_memory = self.video_encoder(visual_seq)
        audio_query = self.audio_decoder(audio_seq, video_memory)
        audio_memory = self.audio_encoder(audio_seq)
        video_query = self.video_decoder(visual_seq, audio_memory)

        audio_gate = self.audio_gated(audio_memory)  # [B, T, 1]
        video_gate = self.video_gated(video_memory)
        # each modality is amplified where the other one says an event is present
        video_out = video_query + self.gate_weight * audio_gate * video_query
        audio_out = audio_query + self.gate_weight * video_gate * audio_query
        return video_out, audio_out, (audio_gate * video_gate).squeeze(-1)


class CMBS(nn.Module):
    """CMBS-style localiser: per-modality class scores (top-k over time, averaged), an
    is-event logit per segment and one event class per clip."""

    def __init__(self, d_model: int = 256, num_classes: int = 28, *, num_heads: int = 4,
                 topk: int = 4, event_weight: float = 0.3, inter_dropout: float = 0.2):
        super().__init__()
        self.topk = topk
        self.event_weight = event_weight
        self.AVInter = AudioVideoInter(d_model, num_heads, inter_dropout)
        self.VAInter = AudioVideoInter(d_model, num_heads, inter_dropout)
        self.localize_module = SupvLocalizeModule(d_model, num_classes)
        self.video_norm = nn.LayerNorm(d_model)
        self.audio_norm = nn.LayerNorm(d_model)
        self.audio_cas = nn.Linear(d_model, num_classes)
        self.video_cas = nn.Linear(d_model, num_classes)

    def _topk_mean(self, cas: Tensor) -> Tensor:
        k = min(self.topk, cas.shape[1])
        return cas.topk(k, dim=1).values.mean(dim=1)

    def forward(self, visual: Tensor, audio: Tensor) -> dict[str, Tensor]:
        av_score = 0.5 * (self._topk_mean(self.video_cas(visual))
                          + self._topk_mean(self.audio_cas(audio)))
        is_event, event = self.localize_module(0.5 * (visual + audio))
        return {"is_event": is_event, "event": event + self.event_weight * av_score,
                "av_score": av_score}


class AVEHead(nn.Module):
    """The DG-SCT AVE head: `temporal_attn` (TemporalAttention) then `CMBS`.

    forward(visual [B, T, visual_dim], audio [B, T, audio_dim]) returns
      is_event [B, T]            logits, one per segment
      event    [B, num_classes]  clip class logits (localiser + event_weight * av_score)
      av_score [B, num_classes]  mean of the two modalities' top-k-over-time class scores
      gate     [B, T]            audio gate * video gate, a probability in (0, 1)
    Defaults are the authors' AVE numbers.
    """

    def __init__(self, visual_dim: int = 1536, audio_dim: int = 768, num_classes: int = 28,
                 gate_weight: float = 0.1, *, video_fc_dim: int = 512, audio_fc_dim: int = 128,
                 d_model: int = 256, num_heads: int = 4, ff_dim: int = 1024,
                 encoder_layers: int = 2, decoder_layers: int = 1, rnn_layers: int = 1,
                 topk: int = 4, event_weight: float = 0.3, dropout: float = 0.2,
                 attn_dropout: float = 0.1, inter_dropout: float = 0.2):
        super().__init__()
        positive = {"visual_dim": visual_dim, "audio_dim": audio_dim,
                    "num_classes": num_classes, "video_fc_dim": video_fc_dim,
                    "audio_fc_dim": audio_fc_dim, "d_model": d_model, "num_heads": num_heads,
                    "ff_dim": ff_dim, "encoder_layers": encoder_layers,
                    "decoder_layers": decoder_layers, "rnn_layers": rnn_layers, "topk": topk}
        bad = [f"{k}={v!r}" for k, v in positive.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"AVEHead: expected positive integers, got {', '.join(bad)}")
        if d_model % 2 or d_model % num_heads:
            raise ValueError(f"AVEHead: d_model={d_model} must be even (the audio LSTM runs "
                             f"d_model/2 each way) and divisible by num_heads={num_heads}")
        self.visual_dim, self.audio_dim, self.num_classes = visual_dim, audio_dim, num_classes
        self.temporal_attn = TemporalAttention(
            visual_dim, audio_dim, video_fc_dim=video_fc_dim, audio_fc_dim=audio_fc_dim,
            d_model=d_model, num_heads=num_heads, ff_dim=ff_dim, encoder_layers=encoder_layers,
            decoder_layers=decoder_layers, rnn_layers=rnn_layers, gate_weight=gate_weight,
            dropout=dropout, attn_dropout=attn_dropout)
        self.CMBS = CMBS(d_model, num_classes, num_heads=num_heads, topk=topk,
                         event_weight=event_weight, inter_dropout=inter_dropout)

    def forward(self, visual: Tensor, audio: Tensor) -> dict[str, Tensor]:
        _check("visual", visual, 3, self.visual_dim, f"[B, T, {self.visual_dim}]")
        _check("audio", audio, 3, self.audio_dim, f"[B, T, {self.audio_dim}]")
        if visual.shape[:2] != audio.shape[:2] or visual.shape[1] == 0:
            raise ValueError(f"visual {tuple(visual.shape)} and audio {tuple(audio.shape)}: "
                             "expected the same B and T (T >= 1)")
        video_feat, audio_feat, gate = self.temporal_attn(visual, audio)
        out = self.CMBS(video_feat, audio_feat)
        out["gate"] = gate
        return out

    @staticmethod
    def unused_parameter_prefixes() -> tuple[str, ...]:
        """Key prefixes the authors register but never use in forward (no gradient)."""
        return ("temporal_attn.video_encoder.encoder_layer.",
                "temporal_attn.audio_encoder.encoder_layer.",
                "temporal_attn.video_decoder.decoder_layer.",
                "temporal_attn.audio_decoder.decoder_layer.",
                "CMBS.AVInter.", "CMBS.VAInter.", "CMBS.video_norm.", "CMBS.audio_norm.")

    def unused_parameter_names(self) -> list[str]:
        """Parameters that never get a gradient (kept only so the authors' keys load)."""
        prefixes = self.unused_parameter_prefixes()
        return [n for n, _ in self.named_parameters()
                if n.startswith(prefixes) or (".decoder.layers." in n and ".self_attn." in n)]


def clip_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """From one-hot segment labels [B, T, C+1] (background last): the is-event target [B, T]
    (float) and the clip class [B] as the authors derive it (the largest foreground class index
    over time; an all-background clip gets class 0)."""
    foreground = labels[..., :-1]
    is_event = foreground.amax(dim=-1)
    clip = foreground.argmax(dim=-1).amax(dim=-1)
    return is_event.to(labels.dtype), clip


def ave_loss(outputs: dict[str, Tensor], labels: Tensor, *,
             gate_as_logits: bool = True) -> tuple[Tensor, dict[str, float]]:
    """The authors' AVE training loss:
    BCE(is_event) + BCE(gate) + CE(event, clip class) + CE(av_score, clip class).

    `gate` is a probability. The authors feed it to BCE-with-logits anyway, which squashes it
    a second time; `gate_as_logits=True` (default) reproduces that, `False` uses plain BCE on
    the probability.
    """
    for key in ("is_event", "event", "av_score", "gate"):
        if key not in outputs:
            raise KeyError(f"outputs: missing {key!r} (have {sorted(outputs)}); "
                           "pass the dict AVEHead.forward returns")
    is_event, event = outputs["is_event"], outputs["event"]
    b, t = is_event.shape
    c = event.shape[-1]
    _check("labels", labels, 3, c + 1, f"[B={b}, T={t}, {c + 1}] (one-hot, background last)")
    if labels.shape[:2] != (b, t):
        raise ValueError(f"labels: got shape {tuple(labels.shape)}, expected [B={b}, T={t}, "
                         f"{c + 1}] to match is_event {tuple(is_event.shape)}")
    target, clip = clip_targets(labels.to(is_event.dtype))
    gate = outputs["gate"]
    if gate_as_logits:
        gate_loss = F.binary_cross_entropy_with_logits(gate, target)
    else:
        gate_loss = F.binary_cross_entropy(gate.clamp(1e-6, 1 - 1e-6), target)
    parts = {
        "is_event": F.binary_cross_entropy_with_logits(is_event, target),
        "gate": gate_loss,
        "event": F.cross_entropy(event, clip),
        "av_score": F.cross_entropy(outputs["av_score"], clip),
    }
    total = sum(parts.values())
    logs = {k: v.item() for k, v in parts.items()}
    logs["total"] = total.item()
    return total, logs
