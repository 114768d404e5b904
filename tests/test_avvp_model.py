"""The AVVP model end to end: build through the registry, inputs, evaluation with its
baselines, and one training step of the single entry point on synthetic LLP data."""
import numpy as np
import pytest
import torch

from dgsct_kernels import train
from dgsct_kernels.metrics import AVVP_SCORE_KEYS, avvp_scores
from dgsct_kernels.models import build_dgsct, get_task, task_names
from dgsct_kernels.models.avvp import AVVPEvaluator, AVVPModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_dgsct("avvp", "tiny", backend="reference").eval()


def test_avvp_is_built_with_paper_and_tiny_presets():
    assert "avvp" in task_names(built=True)
    task = get_task("AVVP")
    assert set(task.presets) == {"paper", "tiny"}
    assert task.score == "segment_type" and task.eval_split == "val"
    assert task.training_defaults("paper")["lr"] == 3e-4  # the authors' main.py
    assert task.modules.gate_weight == 0.05 and task.modules.num_latents == 32


def test_forward_shapes_and_inputs(model):
    assert isinstance(model, AVVPModel) and model.task == "avvp"
    assert model.input_names == ("frames", "audio", "feats")
    inputs = model.example_inputs(batch=2)
    assert inputs["feats"].shape == (2, 10, 512)
    with torch.no_grad():
        out = model(**inputs)
    for key in ("video_prob", "audio_prob", "visual_prob"):
        assert out[key].shape == (2, 25)
    assert out["audio_frame_prob"].shape == out["visual_frame_prob"].shape == (2, 10, 25)
    assert out["features"]["visual"].shape[:2] == (2, 10)
    assert out["spatial_maps"]["visual"].shape[:2] == (2, 10)


def test_bad_extra_inputs_are_named(model):
    inputs = model.example_inputs(batch=1)
    with pytest.raises(TypeError, match=r"missing inputs \['feats'\]"):
        model(frames=inputs["frames"], audio=inputs["audio"])
    with pytest.raises(ValueError, match=r"feats: shape \(1, 10, 256\), expected \[B=1, 10, 512\]"):
        model(**{**inputs, "feats": torch.zeros(1, 10, 256)})
    with pytest.raises(TypeError, match=r"unexpected inputs \['labels'\]"):
        model(**inputs, labels=torch.zeros(1, 25))


def test_evaluator_scores_and_baselines():
    """Outputs that predict the truth exactly score 100 everywhere; the baselines are the
    metric applied to all-absent and to copied video labels."""
    rng = np.random.default_rng(0)
    audio = (rng.random((3, 25, 10)) > 0.85).astype(np.float32)
    visual = (rng.random((3, 25, 10)) > 0.85).astype(np.float32)
    labels = np.maximum(audio, visual).max(-1)
    batch = {"audio_labels": torch.tensor(audio), "visual_labels": torch.tensor(visual),
             "labels": torch.tensor(labels)}
    perfect = {"video_prob": torch.tensor(labels),
               "audio_frame_prob": torch.tensor(audio).transpose(1, 2) * 1.5,  # soft scores > 1
               "visual_frame_prob": torch.tensor(visual).transpose(1, 2)}
    evaluator = get_task("avvp").evaluator()
    evaluator.add({k: v[:2] for k, v in perfect.items()}, {k: v[:2] for k, v in batch.items()})
    other = AVVPEvaluator()
    other.add({k: v[2:] for k, v in perfect.items()}, {k: v[2:] for k, v in batch.items()})
    evaluator.merge(other)  # as DDP merges the processes' evaluators
    result = evaluator.result()
    assert result["videos"] == 3
    for key in AVVP_SCORE_KEYS:
        assert result[key] == pytest.approx(100.0), key
    true_audio, true_visual = audio.astype(np.uint8), visual.astype(np.uint8)
    none = np.zeros_like(true_audio)
    absent = avvp_scores(none, none, true_audio, true_visual)
    copied = np.repeat(labels[:, :, None], 10, axis=2).astype(np.uint8)
    copied_scores = avvp_scores(copied, copied, true_audio, true_visual)
    assert result["absent_segment_type"] == pytest.approx(absent["segment_type"])
    assert result["copied_segment_type"] == pytest.approx(copied_scores["segment_type"])
    assert "segment Type@AV 100.00" in get_task("avvp").describe(result)


def test_evaluator_needs_dense_labels():
    evaluator = AVVPEvaluator()
    outputs = {"video_prob": torch.zeros(1, 25), "audio_frame_prob": torch.zeros(1, 10, 25),
               "visual_frame_prob": torch.zeros(1, 10, 25)}
    with pytest.raises(KeyError, match="dense labels"):
        evaluator.add(outputs, {"labels": torch.zeros(1, 25)})
    with pytest.raises(ValueError, match="no batch"):
        AVVPEvaluator().result()


def test_one_training_step_reports_all_ten_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    summary = train.main(["--task", "AVVP", "--synthetic-videos", "4,2,3", "--epochs", "1",
                          "--max-steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"),
                          "--no-progress", "--backend", "reference"])
    for key in AVVP_SCORE_KEYS:
        assert 0 <= summary[f"final_{key}"] <= 100, key
        assert 0 <= summary[f"test_{key}"] <= 100, key
    assert summary["score"] == "segment_type" and summary["final_videos"] == 2
    # the held-out split, scored once with the best val epoch's weights (max-steps 1: 2 clips)
    assert summary["test_split"] == "test" and summary["test_videos"] == 2
    assert (tmp_path / "run" / "avvp_tiny_best.safetensors").is_file()
    again = build_dgsct("avvp", "tiny", weights=tmp_path / "run" / "avvp_tiny_best.safetensors")
    assert again.weights_report["dgsct"].loaded > 0


def test_authors_avvp_checkpoint_layout_round_trips():
    """A checkpoint in the authors' AVVP key layout (their adapter lists, MGN head names and
    encoder BatchNorm statistics) loads into a fresh model and reproduces every tensor."""
    from dgsct_kernels.models import load_authors_checkpoint, trainable_state_dict
    from dgsct_kernels.models.checkpoints import authors_key_map
    source = build_dgsct("avvp", "tiny")
    torch.manual_seed(3)
    with torch.no_grad():
        for value in trainable_state_dict(source).values():
            if value.is_floating_point():
                value.copy_(torch.randn_like(value).abs() + 0.5)
    names = authors_key_map(source)
    authors = {names[k]: v.clone() for k, v in trainable_state_dict(source).items()}
    assert {"audio_token", "fc_prob.weight", "temporal_attn.audio_gated.0.weight"} <= set(authors)
    assert any(k.startswith("vis_adapter_blocks_p1.") for k in authors)
    target = build_dgsct("avvp", "tiny")
    report = load_authors_checkpoint(target, authors)
    assert report.loaded == len(authors)
    loaded = trainable_state_dict(target)
    for key, value in trainable_state_dict(source).items():
        assert torch.equal(loaded[key], value), key


def test_training_defaults_and_test_split_options():
    args = train.parse_args(["--task", "avvp"])
    assert args.encoders_eval is True  # the tiny AVVP default (registry.py)
    assert (args.eval_split, args.test_split) == ("val", "test")
    assert train.parse_args(["--task", "avvp", "--no-encoders-eval"]).encoders_eval is False
    assert train.parse_args(["--task", "avvp", "--test-split", "None"]).test_split is None
    ave = train.parse_args(["--task", "ave"])
    assert ave.encoders_eval is False and ave.test_split is None  # AVE reports its test split


def test_test_split_must_differ_from_the_selection_split(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "avvp", "--test-split", "val"])
    assert "--test-split='val'" in capsys.readouterr().err
