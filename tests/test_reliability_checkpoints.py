"""Reliability of every load path: a damaged file, a mis-shaped tensor, an extra or a missing
key each raise an error naming the file or the keys, and leave the model bit for bit as it
was (every parameter and buffer), never half loaded. Also the paper preset's warning about
random encoders."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from dgsct_kernels.models import (
    CheckpointError,
    build_dgsct,
    load_authors_checkpoint,
    load_trainable,
    save_trainable,
    trainable_state_dict,
)
from dgsct_kernels.models.checkpoints import TRAINABLE_FORMAT, authors_key_map, load_dgsct
from dgsct_kernels.models.encoders.htsat import htsat_state_dict_to_original
from dgsct_kernels.models.presets import PAPER, TINY, random_encoders_warning, with_overrides
from dgsct_kernels.module import TEMPORAL_GATE_KEYS
from _support import SMALL, make_module, randomised_tiny_ave_model


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [key for key, value in after.items()
               if value.dtype != before[key].dtype or not torch.equal(value, before[key])]
    assert not changed, f"a refused load changed {changed}"


# ---------------------------------------------------------------------------------------
# FusedDGSCT.load_state_dict and load_authors_state_dict


def _with(state, **changes):
    out = dict(state)
    out.update(changes)
    return out


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize("strict", [True, False])
def test_module_shape_mismatch_copies_nothing(strict):
    source, target = make_module(SMALL, seed=1), make_module(SMALL, seed=2)
    bad = _with(source.state_dict(), **{"up_sampler.weight": torch.zeros(3, 3, 1, 1)})
    # torch's own loader copies the fitting tensors before it raises: the partial load
    torn = make_module(SMALL, seed=2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        nn.Module.load_state_dict(torn, bad, strict=strict)
    assert torch.equal(torn.fc.weight, source.fc.weight)

    before = snapshot(target)
    with pytest.raises(RuntimeError) as err:
        target.load_state_dict(bad, strict=strict)
    message = str(err.value)
    assert "up_sampler.weight" in message and "(3, 3, 1, 1)" in message, message
    assert "nothing was copied" in message
    assert_unchanged(target, before)


@pytest.mark.parametrize("edit, words", [
    (lambda s: _without(s, "fc.bias", "bn2.running_var"),
     ["missing keys (2)", "fc.bias", "bn2.running_var"]),
    (lambda s: _with(s, **{"extra.weight": torch.zeros(1)}),
     ["unexpected keys (1)", "extra.weight"]),
    (lambda s: _with(s, **{"gate": [0.0]}), ["not loadable tensors", "gate (list)"]),
])
def test_module_strict_key_problems_copy_nothing(edit, words):
    source, target = make_module(SMALL, seed=1), make_module(SMALL, seed=2)
    before = snapshot(target)
    with pytest.raises(RuntimeError) as err:
        target.load_state_dict(edit(source.state_dict()), strict=True)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert_unchanged(target, before)


def test_module_non_strict_load_keeps_torchs_result():
    source, target = make_module(SMALL, seed=1), make_module(SMALL, seed=2)
    state = _with(_without(source.state_dict(), "fc.bias"), **{"extra.weight": torch.zeros(1)})
    kept_bias = target.fc.bias.detach().clone()
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["fc.bias"] and result.unexpected_keys == ["extra.weight"]
    assert torch.equal(target.fc.weight, source.fc.weight)
    assert torch.equal(target.fc.bias, kept_bias)


def test_module_accepts_what_torch_accepts():
    """A plain dict (no version metadata) may omit BatchNorm's counters, and a 0-dim buffer
    loads from a one-element 1-dim tensor, as in torch."""
    source, target = make_module(SMALL, seed=1), make_module(SMALL, seed=2)
    plain = _without(dict(source.state_dict()), "bn1.num_batches_tracked")
    plain["bn2.num_batches_tracked"] = torch.tensor([7])
    target.load_state_dict(plain, strict=True)
    assert target.bn2.num_batches_tracked.item() == 7
    assert torch.equal(target.my_tokens, source.my_tokens)
    # with version metadata (a real state dict) the counter is required, as in torch
    versioned = source.state_dict()
    del versioned["bn1.num_batches_tracked"]
    with pytest.raises(RuntimeError, match="bn1.num_batches_tracked"):
        target.load_state_dict(versioned, strict=True)


def _authors(state):
    """The module's state dict as the authors' gamma=0 code saves it: no temporal gate."""
    return _without(state, *TEMPORAL_GATE_KEYS)


@pytest.mark.parametrize("edit, words", [
    (lambda s: _with(_authors(s), **{"fc.weight": torch.zeros(2, 2)}), ["fc.weight", "(2, 2)"]),
    (lambda s: _with(_authors(s), **{"extra.weight": torch.zeros(1)}),
     ["unexpected", "extra.weight"]),
    (lambda s: _without(_authors(s), "ln_post.bias"), ["missing", "ln_post.bias"]),
    (lambda s: _without(s, TEMPORAL_GATE_KEYS[1]),  # half a gate layer
     ["missing", TEMPORAL_GATE_KEYS[1], "only all together"]),
])
def test_authors_state_dict_refusals_copy_nothing(edit, words):
    source = make_module(SMALL, seed=1, gamma=0.0)
    target = make_module(SMALL, seed=2, gamma=0.0)
    before = snapshot(target)
    with pytest.raises(RuntimeError) as err:
        target.load_authors_state_dict(edit(source.state_dict()))
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert_unchanged(target, before)


# ---------------------------------------------------------------------------------------
# the model layer (tiny preset)


@pytest.fixture(scope="module")
def source():
    return randomised_tiny_ave_model(seed=20)


@pytest.fixture(scope="module")
def target():
    """Shared by the refusal tests: each compares it with a snapshot taken just before."""
    torch.manual_seed(21)
    return build_dgsct("ave", "tiny", backend="reference")


@pytest.fixture(scope="module")
def trainable_file(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("trainable") / "ave_tiny.safetensors"
    save_trainable(source, path)
    return path


def _damaged_copy(path, tmp_path, name, damage) -> str:
    data = path.read_bytes()
    out = tmp_path / name
    out.write_bytes(damage(data))
    return str(out)


DAMAGES = {
    "truncated": lambda data: data[:-1000],  # the header is intact, the tensors are not all there
    "header_overwritten": lambda data: data[:16] + b"\xff" * 32 + data[48:],
    "length_overwritten": lambda data: (2 ** 40).to_bytes(8, "little") + data[8:],
    "random_garbage": lambda data: os.urandom(len(data)),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("loader", [load_trainable, load_dgsct])
def test_damaged_trainable_file_names_it_and_copies_nothing(target, trainable_file, tmp_path,
                                                            damage, loader):
    bad = _damaged_copy(trainable_file, tmp_path, f"{damage}.safetensors", DAMAGES[damage])
    before = snapshot(target)
    with pytest.raises(CheckpointError) as err:
        loader(target, bad)
    assert bad in str(err.value) and "safetensors" in str(err.value), str(err.value)
    assert err.value.__cause__ is not None  # the reader's own error is chained
    assert_unchanged(target, before)


def test_good_trainable_file_loads(source, trainable_file):
    fresh = build_dgsct("ave", "tiny", backend="reference")
    load_dgsct(fresh, trainable_file)
    expected = trainable_state_dict(source)
    for key, value in trainable_state_dict(fresh).items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.__setitem__("head.CMBS.video_cas.weight", torch.zeros(3, 3)),
     ["shape mismatches (1)", "head.CMBS.video_cas.weight", "(3, 3)"]),
    (lambda s: s.__setitem__("encoder.extra", torch.zeros(1)), ["unexpected keys (1)",
                                                                "encoder.extra"]),
    (lambda s: s.pop("encoder.audio_adapter_blocks_p2.1.bn1.running_mean"),
     ["missing keys (1)", "encoder.audio_adapter_blocks_p2.1.bn1.running_mean"]),
])
def test_mismatched_trainable_file_names_keys_and_copies_nothing(source, target, tmp_path,
                                                                 edit, words):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trainable_state_dict(source).items()}
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, path, metadata={"format": TRAINABLE_FORMAT})
    before = snapshot(target)
    with pytest.raises(CheckpointError) as err:
        load_dgsct(target, path)
    for word in [str(path), *words]:
        assert word in str(err.value), (word, str(err.value))
    assert_unchanged(target, before)


def _authors_checkpoint(model) -> dict[str, torch.Tensor]:
    """The trainable part under the authors' names, without temporal_gated (their gamma=0)."""
    state = trainable_state_dict(model)
    return {theirs: state[ours].clone() for ours, theirs in authors_key_map(model).items()
            if theirs.split(".", 2)[2] not in TEMPORAL_GATE_KEYS}


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.__setitem__("mlp_class.weight", torch.zeros(3)),
     ["unexpected keys (1)", "mlp_class.weight"]),
    (lambda c: c.pop("audio_adapter_blocks_p1.2.my_tokens"),
     ["missing keys (1)", "audio_adapter_blocks_p1.2.my_tokens"]),
    (lambda c: c.__setitem__("vis_adapter_blocks_p2.0.conv_adapter.weight", torch.zeros(2, 2)),
     ["shape mismatches (1)", "vis_adapter_blocks_p2.0.conv_adapter.weight", "(2, 2)"]),
])
def test_mismatched_authors_file_names_keys_and_copies_nothing(source, target, tmp_path,
                                                               edit, words):
    ckpt = _authors_checkpoint(source)
    edit(ckpt)
    path = tmp_path / "authors_ave.pt"
    torch.save(ckpt, path)
    before = snapshot(target)
    for loader in (load_authors_checkpoint, load_dgsct):
        with pytest.raises(CheckpointError) as err:
            loader(target, path)
        for word in [str(path), *words]:
            assert word in str(err.value), (loader.__name__, word, str(err.value))
        assert_unchanged(target, before)


@pytest.mark.parametrize("damage", ["truncated", "random_garbage", "empty"])
def test_damaged_authors_file_names_it_and_copies_nothing(source, target, tmp_path, damage):
    good = tmp_path / "good.pt"
    torch.save(_authors_checkpoint(source), good)
    bad = _damaged_copy(good, tmp_path, f"{damage}.pt", DAMAGES[damage])
    before = snapshot(target)
    with pytest.raises(CheckpointError) as err:
        load_dgsct(target, bad)
    assert bad in str(err.value) and "torch checkpoint" in str(err.value), str(err.value)
    assert err.value.__cause__ is not None
    assert_unchanged(target, before)


def test_authors_encoders_refused_by_the_audio_part_leave_the_visual_untouched(source, target):
    """encoders=True loads two encoders and the trainable part: a bad HTS-AT part must stop
    the visual encoder's load too."""
    ckpt = _authors_checkpoint(source)
    ckpt.update({"swin." + k: v + 1.0 if v.is_floating_point() else v
                 for k, v in source.encoder.visual.state_dict().items()})
    htsat = {"htsat." + k[len("sed_model."):]: v
             for k, v in htsat_state_dict_to_original(source.encoder.audio).items()}
    htsat["htsat.patch_embed.proj.weight"] = torch.zeros(1, 2, 3)
    ckpt.update(htsat)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="htsat.*patch_embed.proj.weight"):
        load_authors_checkpoint(target, ckpt, encoders=True)
    assert_unchanged(target, before)


@pytest.mark.parametrize("strict", [True, False])
def test_whole_model_load_state_dict_is_atomic(source, target, strict):
    state = dict(source.state_dict())
    state["head.CMBS.video_cas.weight"] = torch.zeros(5, 5)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=r"head.CMBS.video_cas.weight: checkpoint \(5, 5\)"):
        target.load_state_dict(state, strict=strict)
    assert_unchanged(target, before)


# ---------------------------------------------------------------------------------------
# the paper preset's random encoders


def _paper_sized_as_tiny():
    """The paper preset (same flag, same name) with the tiny sizes, so it builds in a second."""
    return with_overrides(PAPER, image_size=TINY.image_size, visual=TINY.visual,
                          audio=TINY.audio, head=TINY.head)


def _our_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "randomly initialised" in str(w.message)]


def test_paper_preset_without_encoder_weights_warns():
    assert PAPER.pretrained_encoders and not TINY.pretrained_encoders
    with pytest.warns(UserWarning) as record:
        build_dgsct("ave", _paper_sized_as_tiny(), backend="reference")
    (message,) = _our_warnings(record)
    assert "preset='paper'" in message and "visual and audio encoders" in message
    assert "weights={'visual'" in message and "'audio'" in message
    # it points at the caller's line, not at build_dgsct
    assert [w.filename for w in record if "randomly initialised" in str(w.message)] == [__file__]


def test_warning_names_only_the_encoders_left_random(tmp_path):
    from safetensors.torch import save_file

    spec = _paper_sized_as_tiny()
    visual = build_dgsct("ave", "tiny").encoder.visual
    path = tmp_path / "swin_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, path)
    with pytest.warns(UserWarning) as record:
        build_dgsct("ave", spec, weights={"visual": path}, backend="reference")
    (message,) = _our_warnings(record)
    assert "the audio encoder, so it is randomly initialised" in message
    assert random_encoders_warning(spec, {"visual": "v", "audio": "a"}) is None


def test_tiny_preset_does_not_warn():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_dgsct("ave", "tiny", backend="reference")
    assert not _our_warnings(record)
