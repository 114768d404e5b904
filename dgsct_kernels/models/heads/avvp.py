"""AVVP head: the DG-SCT authors' MGN (multi-modal grouping network) with temporal attention.

Written from scratch after the DG-SCT authors' `AVVP/nets/mgn.py` (MGN_Net, TemporalAttention)
and `AVVP/nets/grouping.py` (ModalityTrans, GroupingBlock, AssignAttention, ...), with the loss
of `AVVP/main.py`. Submodules and parameters keep the authors' names at the same nesting, so
the head entries of their checkpoint (`fc_a.*`, `fc_v.*`, `fc_st.*`, `fc_fusion.*`,
`audio_token`, `visual_token`, `audio_cug.*`, `visual_cug.*`, `av_mcg.*`, `fc_prob*.*`,
`fc_cls.*`, `temporal_attn.*`) load into `AVVPHead` unchanged with `strict=True`; the
encoders' entries (`swin.*`, `htsat.*`, `*adapter_blocks*`, `adapter_token_downsampler.*`)
are not the head's. `avvp_head_key_map` / `avvp_head_state_dict` pick the head's entries
out of a full authors' state dict (also one saved from DataParallel, `module.` prefix).

Data flow (B clips, T = 10 one-second segments, C = 25 classes, D = `dim` = 128):
  audio  [B, T, 768]  --fc_a-->  x1_0 [B, T, D]
  visual [B, T, 1536] --fc_v-->  vid_s [B, T, D]
  temporal attention (BiLSTM d_model=64, 2 self-attention layers, sigmoid gate): the audio
      gate amplifies the visual features, vid_s * (1 + 0.05 * audio_gate)
  visual_st [B, T, 512] --fc_st--> cat with vid_s --fc_fusion--> x2_0 [B, T, D]
  visual_cug(x2_0, visual_token) -> x2 [B, C, D]  (class-aware uni-modal grouping)
  audio_cug(x1_0, audio_token, x2_0) -> x1 [B, C, D]  (first a "HAN" grouping of the audio
      segments onto the visual segments, then the class-aware grouping)
  av_mcg(x1, x2) -> x [B, C, D]  (cross-modal grouping, the visual class tokens as groups)
  sigmoid(fc_prob(x)), sigmoid(fc_prob_a(x1)), sigmoid(fc_prob_v(x2)): per-class video-level
      probabilities; each modality's times its class-to-segment assignment map gives the
      per-segment scores.

Faithful to the authors, including three things worth knowing:
  * In their forward the temporal attention returns the gated audio too, but the grouping
    reads the *ungated* fc_a output (`x1` is overwritten). So only the audio side (audio LSTM,
    audio encoder, audio gate) matters; `temporal_attn.video_encoder.*`,
    `temporal_attn.video_gated.*` and `temporal_attn.audio_visual_rnn_layer.visual_rnn.*` never
    get a gradient, nor do the never-called prototype layers `*.encoder_layer.*`.
    `AVVPHead.unused_parameter_names()` lists them; `use_gated_audio=True` (not the authors')
    feeds the gated audio to the grouping instead.
  * With the authors' default "soft" uni-modal assignment, the per-segment map is
    `1 + softmax_T(softmax_classes(scores))`, which lies in (1, 2); the segment scores
    (`audio_frame_prob`, `visual_frame_prob`) therefore lie in (p, 2p) for the video-level
    probability p, i.e. in (0, 2), not [0, 1]. Their evaluation thresholds them at 0.5.
    With "hard" assignment the map is the (straight-through) one-hot assignment and the
    scores lie in [0, 1].
  * The class tokens start at zero (only `nn.Linear`/`nn.LayerNorm` are re-initialised by the
    authors' `_init_weights`; the temporal attention, built after it, keeps PyTorch's init).

Left out (no parameters, no effect at the authors' settings): dropouts with p = 0, the
timm `DropPath` is replaced by an equivalent local one, einops by reshapes.
Layout: batch first, `[B, T, C]` throughout (the authors' temporal encoders run sequence
first; the maths is the same).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ave import TemporalEncoder, _check

__all__ = ["AVVPHead", "AVVPTemporalAttention", "ModalityTrans", "GroupingBlock",
           "AVVP_HEAD_PREFIXES", "avvp_head_key_map", "avvp_head_state_dict", "avvp_loss",
           "avvp_loss_targets"]


# --------------------------------------------------------------------------------------------
# Building blocks (grouping.py)
# --------------------------------------------------------------------------------------------

class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (the authors' dropout is p = 0)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (as timm's, survivors scaled by 1 / keep)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep if keep > 0 else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _heads(x: Tensor, h: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)  # [B, h, N, C/h]


def _merge(x: Tensor) -> Tensor:
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class Attention(nn.Module):
    """Multi-head attention: fused `qkv` (self-attention) or `q_proj`/`k_proj`/`v_proj`."""

    def __init__(self, dim: int, num_heads: int, *, qkv_fuse: bool, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv_fuse = qkv_fuse
        if qkv_fuse:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor | None = None) -> Tensor:
        h = self.num_heads
        if self.qkv_fuse:
            q, k, v = (_heads(t, h) for t in self.qkv(query).chunk(3, dim=-1))
        else:
            key = query if key is None else key
            q, k, v = _heads(self.q_proj(query), h), _heads(self.k_proj(key), h), \
                _heads(self.v_proj(key), h)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj(_merge(attn @ v))


class AttnBlock(nn.Module):
    """Pre-norm self-attention block with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_fuse=True)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """Cross-attention block, post-norm variant (the only one the authors use): the query
    attends to the key, MLP, then `norm_post`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_post = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_fuse=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        x = query + self.attn(query, key)
        return self.norm_post(x + self.mlp(self.norm2(x)))


def _hard_softmax(logits: Tensor, dim: int) -> Tensor:
    soft = logits.softmax(dim)
    hard = torch.zeros_like(logits).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return hard - soft.detach() + soft  # straight through


def _gumbel_softmax(logits: Tensor, dim: int, hard: bool, tau: float) -> Tensor:
    finfo = torch.finfo(logits.dtype)
    u = torch.rand_like(logits).clamp(finfo.tiny, 1.0 - finfo.eps)
    soft = ((logits - torch.log(-torch.log(u))) / tau).softmax(dim)
    if not hard:
        return soft
    hard_one = torch.zeros_like(logits).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return hard_one - soft.detach() + soft


class AssignAttention(nn.Module):
    """Single-head assignment of inputs (keys) to group tokens (queries): the softmax runs
    over the *groups* (dim -2), hard (straight-through one-hot) and/or Gumbel-sampled in
    training, then each group's weights are divided by (their sum + 1).

    Returns the grouped features [B, N, C] and the assignment maps [B, 1, N, S]:
    `hard` is the assignment used, `soft` the authors' `1 + softmax_S(softmax_N(scores))`.
    """

    def __init__(self, dim: int, *, hard: bool, gumbel: bool, gumbel_tau: float = 1.0,
                 assign_eps: float = 1.0):
        super().__init__()
        self.scale = dim ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.hard, self.gumbel, self.gumbel_tau = hard, gumbel, gumbel_tau
        self.assign_eps = assign_eps

    def forward(self, query: Tensor, key: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        q, k, v = _heads(self.q_proj(query), 1), _heads(self.k_proj(key), 1), \
            _heads(self.v_proj(key), 1)
        raw = (q @ k.transpose(-2, -1)) * self.scale  # [B, 1, N, S]
        if self.gumbel and self.training:
            attn = _gumbel_softmax(raw, -2, self.hard, self.gumbel_tau)
        elif self.hard:
            attn = _hard_softmax(raw, -2)
        else:
            attn = raw.softmax(dim=-2)
        maps = {"hard": attn, "soft": 1.0 + raw.softmax(dim=-2).softmax(dim=-1)}
        attn = attn / (attn.sum(dim=-1, keepdim=True) + self.assign_eps)
        return self.proj(_merge(attn @ v)), maps


class GroupingBlock(nn.Module):
    """Groups the inputs x [B, S, C] into `num_output_group` tokens, starting from
    `num_group_token` group tokens [B, S1, C] (mixed over the token axis by `mlp_inter`).
    The authors' GroupingBlock and GroupingBlock_Han are this same module."""

    def __init__(self, dim: int, num_heads: int, num_group_token: int, num_output_group: int,
                 *, hard: bool, gumbel: bool, mlp_ratio: tuple[float, float] = (0.5, 4.0)):
        super().__init__()
        tokens_dim, channels_dim = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_token, tokens_dim, num_output_group)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads)
        self.assign = AssignAttention(dim, hard=hard, gumbel=gumbel)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_dim, dim)
        # the authors' `reduction` is an Identity when out_dim == dim, which they always use

    def forward(self, x: Tensor, group_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        projected = self.mlp_inter(group_tokens.transpose(1, 2)).transpose(1, 2)
        projected = self.pre_assign_attn(self.norm_post_tokens(projected), x)
        new_x, maps = self.assign(projected, x)
        new_x = new_x + projected
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), maps


class ModalityTrans(nn.Module):
    """Transformer over [x, group tokens] concatenated, optionally a HAN grouping of x onto
    the other modality's segments, then grouping of x into the group tokens' classes.

    forward(x [B, L, C], group_token [G, C] or [B, G, C], x_other [B, T, C] | None)
    -> grouped [B, G, C], assignment maps ([B, 1, G, L]).
    """

    def __init__(self, dim: int, *, depth: int, num_heads: int, mlp_ratio: float,
                 drop_path: float, num_group_tokens: int, num_output_groups: int,
                 hard_assignment: bool, use_han: bool, num_segments: int):
        super().__init__()
        self.num_group_token = num_group_tokens
        self.blocks = nn.ModuleList(AttnBlock(dim, num_heads, mlp_ratio, drop_path)
                                    for _ in range(depth))
        # the authors' HAN block uses the opposite assignment style (Gumbel-hard for "soft")
        self.han_encoder = (GroupingBlock(dim, num_heads, num_segments, num_segments,
                                          hard=not hard_assignment, gumbel=not hard_assignment)
                            if use_han else None)
        self.grouping = GroupingBlock(dim, num_heads, num_group_tokens, num_output_groups,
                                      hard=hard_assignment, gumbel=hard_assignment)

    def forward(self, x: Tensor, group_token: Tensor,
                x_other: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        group_token = group_token.expand(x.shape[0], -1, -1)
        cat = torch.cat([x, group_token], dim=1)
        for block in self.blocks:
            cat = block(cat)
        x, group_token = cat[:, :-self.num_group_token], cat[:, -self.num_group_token:]
        if self.han_encoder is not None and x_other is not None:
            x, _ = self.han_encoder(x, x_other)
        return self.grouping(x, group_token)


# --------------------------------------------------------------------------------------------
# Temporal attention (mgn.py TemporalAttention, the AVVP variant)
# --------------------------------------------------------------------------------------------

class RNNEncoder(nn.Module):
    """Bidirectional LSTMs, d_model each way for both modalities (-> 2*d_model)."""

    def __init__(self, input_dim: int, d_model: int, num_layers: int):
        super().__init__()
        dropout = 0.2 if num_layers > 1 else 0.0  # the authors' 0.2 is a no-op at 1 layer
        self.audio_rnn = nn.LSTM(input_dim, d_model, num_layers=num_layers, batch_first=True,
                                 bidirectional=True, dropout=dropout)
        self.visual_rnn = nn.LSTM(input_dim, d_model, num_layers=num_layers,
                                  batch_first=True, bidirectional=True, dropout=dropout)


class AVVPTemporalAttention(nn.Module):
    """The AVVP variant of DG-SCT's temporal attention: no fc layers, no cross-modal
    decoders; BiLSTM -> self-attention encoder -> sigmoid gate per segment, and each modality
    is amplified where the *other* modality's gate fires: v * (1 + gate_weight * audio_gate).

    forward(visual [B, T, D], audio [B, T, D], need_audio=False) returns
    (gated visual [B, T, D], gated audio [B, T, D] or None, audio gate [B, T]).
    The gated audio (hence the visual LSTM/encoder/gate) is only computed when asked for;
    the authors compute and discard it.
    """

    def __init__(self, input_dim: int = 128, d_model: int = 64, *, num_heads: int = 4,
                 ff_dim: int = 1024, encoder_layers: int = 2, rnn_layers: int = 1,
                 gate_weight: float = 0.05, attn_dropout: float = 0.1):
        super().__init__()
        self.gate_weight = gate_weight
        layer = {"d_model": d_model, "nhead": num_heads, "dim_feedforward": ff_dim,
                 "num_layers": encoder_layers, "dropout": attn_dropout}
        self.video_encoder = TemporalEncoder(2 * d_model, **layer)
        self.audio_encoder = TemporalEncoder(2 * d_model, **layer)
        self.audio_visual_rnn_layer = RNNEncoder(input_dim, d_model, rnn_layers)
        self.audio_gated = nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid())
        self.video_gated = nn.Sequential(nn.Linear(d_model, 1), nn.Sigmoid())

    def forward(self, visual: Tensor, audio: Tensor,
                need_audio: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        rnn = self.audio_visual_rnn_layer
        audio_gate = self.audio_gated(self.audio_encoder(rnn.audio_rnn(audio)[0]))  # [B, T, 1]
        visual_out = visual + self.gate_weight * audio_gate * visual
        audio_out = None
        if need_audio:
            video_gate = self.video_gated(self.video_encoder(rnn.visual_rnn(visual)[0]))
            audio_out = audio + self.gate_weight * video_gate * audio
        return visual_out, audio_out, audio_gate.squeeze(-1)


# --------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------

class AVVPHead(nn.Module):
    """The DG-SCT AVVP head (MGN with temporal attention).

    Constructor (defaults are the authors' AVVP settings, train.sh + main.py defaults):
      visual_dim=1536, audio_dim=768, st_dim=512  input feature sizes (Swin, HTS-AT, R(2+1)D)
      num_classes=25      also the number of class tokens per modality
      dim=128             the grouping width (`--dim`)
      gate_weight=0.05    temporal attention gate weight (the authors' gamma)
      num_segments=10     T; the HAN grouping's token-mixing MLP is sized by it
      d_model=64, temporal_heads=4, temporal_ff_dim=1024, temporal_layers=2, rnn_layers=1
      depth_aud=3, depth_vis=3, depth_av=6, num_heads=8, mlp_ratio=4.0, drop_path=0.1
      unimodal_assign="soft", crossmodal_assign="soft"  ("soft" or "hard")
      use_gated_audio=False  True feeds the gated audio to the grouping (not the authors')
      token_init_std=0.0  the class tokens start at zero as the authors' do: every group is
                          alike until the class-token cross-entropy tells them apart (about
                          300 steps); > 0 draws them from N(0, std^2) instead (tiny preset)

    forward(visual [B, T, visual_dim], audio [B, T, audio_dim], visual_st [B, T, st_dim])
    returns a dict:
      video_prob         [B, C]  audio-visual video-level probability (authors' global_prob)
      audio_prob         [B, C]  audio video-level probability (a_prob)
      visual_prob        [B, C]  visual video-level probability (v_prob)
      audio_frame_prob   [B, T, C]  per-segment audio score (a_frame_prob); in (0, 2) with
                                    "soft" assignment, see the module docstring
      visual_frame_prob  [B, T, C]  per-segment visual score (v_frame_prob)
      audio_cls_logits   [C, C]  fc_cls(audio_token): class-token logits (aud_cls_prob)
      visual_cls_logits  [C, C]  fc_cls(visual_token) (vis_cls_prob)
      audio_gate         [B, T]  the temporal attention's audio gate, in (0, 1)
    """

    def __init__(self, visual_dim: int = 1536, audio_dim: int = 768, st_dim: int = 512,
                 num_classes: int = 25, dim: int = 128, gate_weight: float = 0.05, *,
                 num_segments: int = 10, d_model: int = 64, temporal_heads: int = 4,
                 temporal_ff_dim: int = 1024, temporal_layers: int = 2, rnn_layers: int = 1,
                 depth_aud: int = 3, depth_vis: int = 3, depth_av: int = 6, num_heads: int = 8,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 unimodal_assign: str = "soft", crossmodal_assign: str = "soft",
                 use_gated_audio: bool = False, attn_dropout: float = 0.1,
                 token_init_std: float = 0.0):
        super().__init__()
        positive = {"visual_dim": visual_dim, "audio_dim": audio_dim, "st_dim": st_dim,
                    "num_classes": num_classes, "dim": dim, "num_segments": num_segments,
                    "d_model": d_model, "temporal_heads": temporal_heads,
                    "temporal_ff_dim": temporal_ff_dim, "temporal_layers": temporal_layers,
                    "rnn_layers": rnn_layers, "depth_aud": depth_aud, "depth_vis": depth_vis,
                    "depth_av": depth_av, "num_heads": num_heads}
        bad = [f"{k}={v!r}" for k, v in positive.items()
               if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"AVVPHead: expected positive integers, got {', '.join(bad)}")
        if dim % num_heads:
            raise ValueError(f"AVVPHead: dim={dim} must be divisible by num_heads={num_heads}")
        if d_model % temporal_heads:
            raise ValueError(f"AVVPHead: d_model={d_model} must be divisible by "
                             f"temporal_heads={temporal_heads}")
        for name, value in (("unimodal_assign", unimodal_assign),
                            ("crossmodal_assign", crossmodal_assign)):
            if value not in ("soft", "hard"):
                raise ValueError(f"AVVPHead: {name}={value!r}, expected 'soft' or 'hard'")
        if not (isinstance(token_init_std, Real) and 0.0 <= token_init_std < math.inf):
            raise ValueError(f"AVVPHead: token_init_std={token_init_std!r}, expected a finite "
                             "number >= 0")
        if not 0.0 <= drop_path < 1.0 or not mlp_ratio > 0:
            raise ValueError(f"AVVPHead: expected 0 <= drop_path < 1 and mlp_ratio > 0, got "
                             f"drop_path={drop_path!r}, mlp_ratio={mlp_ratio!r}")
        self.visual_dim, self.audio_dim, self.st_dim = visual_dim, audio_dim, st_dim
        self.num_classes, self.num_segments = num_classes, num_segments
        self.unimodal_assign = unimodal_assign
        self.use_gated_audio = use_gated_audio

        self.fc_a = nn.Linear(audio_dim, dim)
        self.fc_v = nn.Linear(visual_dim, dim)
        self.fc_st = nn.Linear(st_dim, dim)
        self.fc_fusion = nn.Linear(2 * dim, dim)
        self.audio_token = nn.Parameter(torch.zeros(num_classes, dim))
        self.visual_token = nn.Parameter(torch.zeros(num_classes, dim))
        uni_hard, cross_hard = unimodal_assign == "hard", crossmodal_assign == "hard"
        common = {"num_heads": num_heads, "mlp_ratio": mlp_ratio, "drop_path": drop_path,
                  "num_group_tokens": num_classes, "num_output_groups": num_classes,
                  "num_segments": num_segments}
        self.audio_cug = ModalityTrans(dim, depth=depth_aud, hard_assignment=uni_hard,
                                       use_han=True, **common)
        self.visual_cug = ModalityTrans(dim, depth=depth_vis, hard_assignment=uni_hard,
                                        use_han=False, **common)
        self.av_mcg = ModalityTrans(dim, depth=depth_av, hard_assignment=cross_hard,
                                    use_han=False, **common)
        self.fc_prob = nn.Linear(dim, 1)
        self.fc_prob_a = nn.Linear(dim, 1)
        self.fc_prob_v = nn.Linear(dim, 1)
        self.fc_cls = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)  # as the authors: before the temporal attention exists
        if token_init_std > 0:  # the authors start from zeros: see the class docstring
            nn.init.normal_(self.audio_token, std=token_init_std)
            nn.init.normal_(self.visual_token, std=token_init_std)
        self.temporal_attn = AVVPTemporalAttention(
            dim, d_model, num_heads=temporal_heads, ff_dim=temporal_ff_dim,
            encoder_layers=temporal_layers, rnn_layers=rnn_layers, gate_weight=gate_weight,
            attn_dropout=attn_dropout)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, visual: Tensor, audio: Tensor, visual_st: Tensor) -> dict[str, Tensor]:
        t = self.num_segments
        _check("visual", visual, 3, self.visual_dim, f"[B, T={t}, {self.visual_dim}]")
        _check("audio", audio, 3, self.audio_dim, f"[B, T={t}, {self.audio_dim}]")
        _check("visual_st", visual_st, 3, self.st_dim, f"[B, T={t}, {self.st_dim}]")
        if not (visual.shape[:2] == audio.shape[:2] == visual_st.shape[:2]) \
                or visual.shape[1] != t or visual.shape[0] == 0:
            raise ValueError(f"visual {tuple(visual.shape)}, audio {tuple(audio.shape)} and "
                             f"visual_st {tuple(visual_st.shape)}: expected the same B >= 1 "
                             f"and T = num_segments = {t}")

        x1_0 = self.fc_a(audio)
        vid_s, x1_gated, audio_gate = self.temporal_attn(self.fc_v(visual), x1_0,
                                                         need_audio=self.use_gated_audio)
        if x1_gated is not None:
            x1_0 = x1_gated
        x2_0 = self.fc_fusion(torch.cat([vid_s, self.fc_st(visual_st)], dim=-1))

        x2, maps_visual = self.visual_cug(x2_0, self.visual_token)
        x1, maps_audio = self.audio_cug(x1_0, self.audio_token, x2_0)
        x, _ = self.av_mcg(x1, x2)

        a_prob = torch.sigmoid(self.fc_prob_a(x1))  # [B, C, 1]
        v_prob = torch.sigmoid(self.fc_prob_v(x2))
        attn_audio = maps_audio[self.unimodal_assign].squeeze(1)  # [B, C, T]
        attn_visual = maps_visual[self.unimodal_assign].squeeze(1)
        return {
            "video_prob": torch.sigmoid(self.fc_prob(x)).squeeze(-1),
            "audio_prob": a_prob.squeeze(-1),
            "visual_prob": v_prob.squeeze(-1),
            "audio_frame_prob": (a_prob * attn_audio).transpose(1, 2),
            "visual_frame_prob": (v_prob * attn_visual).transpose(1, 2),
            "audio_cls_logits": self.fc_cls(self.audio_token),
            "visual_cls_logits": self.fc_cls(self.visual_token),
            "audio_gate": audio_gate,
        }

    def unused_parameter_names(self) -> list[str]:
        """Parameters the forward never uses (kept only so the authors' keys load): the
        prototype encoder layers and, unless `use_gated_audio`, the visual side of the
        temporal attention."""
        prefixes = ["temporal_attn.video_encoder.encoder_layer.",
                    "temporal_attn.audio_encoder.encoder_layer."]
        if not self.use_gated_audio:
            prefixes += ["temporal_attn.video_encoder.", "temporal_attn.video_gated.",
                         "temporal_attn.audio_visual_rnn_layer.visual_rnn."]
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(prefixes))]


# --------------------------------------------------------------------------------------------
# Checkpoint keys
# --------------------------------------------------------------------------------------------

#: The head's entries in the authors' MGN_Net state dict. Our names are theirs, so the key map
#: is the identity on these; every other entry (swin.*, htsat.*, *adapter_blocks_p1/p2.*,
#: adapter_token_downsampler.*) belongs to the encoders.
AVVP_HEAD_PREFIXES = ("fc_a.", "fc_v.", "fc_st.", "fc_fusion.", "audio_token", "visual_token",
                      "audio_cug.", "visual_cug.", "av_mcg.", "fc_prob.", "fc_prob_a.",
                      "fc_prob_v.", "fc_cls.", "temporal_attn.")


def _is_head_key(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in AVVP_HEAD_PREFIXES)


def avvp_head_key_map(keys: Iterable[str]) -> dict[str, str]:
    """{authors' key: AVVPHead key} for the head entries among `keys` (a DataParallel
    `module.` prefix is dropped; the rest of the name is unchanged). Encoder keys are left
    out."""
    out = {}
    for key in keys:
        ours = key[len("module."):] if key.startswith("module.") else key
        if _is_head_key(ours):
            out[key] = ours
    return out


def avvp_head_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The head's part of an authors' MGN_Net state dict, keyed for `AVVPHead.load_state_dict`.
    """
    return {ours: state_dict[key] for key, ours in avvp_head_key_map(state_dict).items()}


# --------------------------------------------------------------------------------------------
# Loss (main.py train())
# --------------------------------------------------------------------------------------------

_OUTPUT_KEYS = ("video_prob", "audio_prob", "visual_prob", "audio_cls_logits",
                "visual_cls_logits")


def avvp_loss_targets(video_labels: Tensor, audio_smoothing: float = 1.0,
                      visual_smoothing: float = 0.9) -> tuple[Tensor, Tensor]:
    """The authors' per-modality targets from the weak video labels y:
    P = s * y + (1 - s) * 0.5, with s = 1.0 for audio (P_a = y) and s = 0.9 for visual
    (P_v = 0.9 y + 0.05: 0.95 for a present class, 0.05 for an absent one)."""
    return (audio_smoothing * video_labels + (1 - audio_smoothing) * 0.5,
            visual_smoothing * video_labels + (1 - visual_smoothing) * 0.5)


def avvp_loss(outputs: Mapping[str, Tensor], video_labels: Tensor, *,
              audio_smoothing: float = 1.0, visual_smoothing: float = 0.9,
              eps: float = 1e-7) -> tuple[Tensor, dict[str, float]]:
    """The authors' AVVP training loss (DG-SCT AVVP/main.py), summed with unit weights:

      video      BCE(video_prob, y)
      audio      BCE(audio_prob, P_a)          P_a = 1.0 * y + 0.0 * 0.5 = y
      visual     BCE(visual_prob, P_v)         P_v = 0.9 * y + 0.1 * 0.5 (label smoothing)
      audio_cls  CE(audio_cls_logits, [0, 1, ..., C-1])   (class token c must say class c)
      visual_cls CE(visual_cls_logits, [0, 1, ..., C-1])

    y = `video_labels` [B, C], the weak (video-level) multi-hot labels. The three
    probabilities are clamped to [eps, 1 - eps] first, as the authors do (they clamp in
    place; here a copy, so `outputs` is left as it was). BCE is the mean over B and C; CE the
    mean over the C tokens. Returns (total, {part: float, ..., "total": float}).
    """
    if not isinstance(outputs, Mapping):
        raise TypeError(f"outputs: expected the dict AVVPHead.forward returns, got "
                        f"{type(outputs).__name__}")
    for key in _OUTPUT_KEYS:
        if key not in outputs:
            raise KeyError(f"outputs: missing {key!r} (have {sorted(outputs)}); "
                           "pass the dict AVVPHead.forward returns")
    prob = outputs["video_prob"]
    _check("outputs['video_prob']", prob, 2, None, "[B, C]")
    b, c = prob.shape
    for key in ("audio_prob", "visual_prob"):
        _check(f"outputs[{key!r}]", outputs[key], 2, c, f"[B={b}, C={c}]")
        if outputs[key].shape[0] != b:
            raise ValueError(f"outputs[{key!r}]: got shape {tuple(outputs[key].shape)}, "
                             f"expected [B={b}, C={c}]")
    for key in ("audio_cls_logits", "visual_cls_logits"):
        _check(f"outputs[{key!r}]", outputs[key], 2, c, f"[C={c}, C={c}]")
        if outputs[key].shape[0] != c:
            raise ValueError(f"outputs[{key!r}]: got shape {tuple(outputs[key].shape)}, "
                             f"expected [C={c}, C={c}] (one row per class token)")
    if not isinstance(video_labels, Tensor):
        raise TypeError(f"video_labels: expected a Tensor [B={b}, C={c}] (multi-hot), got "
                        f"{type(video_labels).__name__}")
    if video_labels.shape != (b, c):
        raise ValueError(f"video_labels: got shape {tuple(video_labels.shape)}, expected "
                         f"[B={b}, C={c}] (multi-hot weak labels) to match video_prob "
                         f"{tuple(prob.shape)}")
    if video_labels.is_complex():
        raise TypeError(f"video_labels: got dtype {video_labels.dtype}, expected a real dtype")
    y = video_labels.to(prob.dtype)
    if y.numel() and not bool(((y >= 0) & (y <= 1)).all()):
        raise ValueError(f"video_labels: values must lie in [0, 1], got min {y.min().item()} "
                         f"and max {y.max().item()}")
    for name, s in (("audio_smoothing", audio_smoothing), ("visual_smoothing", visual_smoothing)):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{name}={s!r}: expected a value in [0, 1]")

    target_a, target_v = avvp_loss_targets(y, audio_smoothing, visual_smoothing)
    cls_target = torch.arange(c, device=prob.device)
    parts = {
        "video": F.binary_cross_entropy(prob.clamp(eps, 1 - eps), y),
        "audio": F.binary_cross_entropy(outputs["audio_prob"].clamp(eps, 1 - eps), target_a),
        "visual": F.binary_cross_entropy(outputs["visual_prob"].clamp(eps, 1 - eps), target_v),
        "audio_cls": F.cross_entropy(outputs["audio_cls_logits"], cls_target),
        "visual_cls": F.cross_entropy(outputs["visual_cls_logits"], cls_target),
    }
    total = sum(parts.values())
    logs = {k: v.item() for k, v in parts.items()}
    logs["total"] = total.item()
    return total, logs
