"""The task registry: names, presets, training defaults, build_dgsct going through it."""
import pytest
import torch

from dgsct_kernels.models import TASKS, build_dgsct, get_task, register_task, task_names
from dgsct_kernels.models.presets import PAPER, TINY, with_overrides
from dgsct_kernels.models.registry import AVE_TRAINING, Task


def test_every_spec_task_is_registered_and_ave_is_built():
    assert task_names() == sorted(TASKS)
    assert "ave" in task_names(built=True)
    for name in task_names(built=False):
        assert not get_task(name).built


def test_names_are_case_insensitive_and_unknown_names_list_the_known():
    assert get_task("AVE") is get_task("ave") is get_task("Ave")
    with pytest.raises(ValueError, match=r"task='nope': unknown; expected one of \['ave', 'avqa'"):
        get_task("nope")
    with pytest.raises(ValueError, match="task=None"):
        get_task(None)
    with pytest.raises(ValueError, match="lower case"):
        register_task(Task("AVE2", TASKS["ave"]))


def test_presets_and_training_defaults_live_with_the_task():
    ave = get_task("ave")
    assert ave.preset("TINY") is TINY and ave.preset("paper") is PAPER
    custom = with_overrides("tiny", image_size=32)
    assert ave.preset(custom) is custom
    with pytest.raises(ValueError, match=r"preset='huge': task 'ave' has presets \['paper', 'tiny'\]"):
        ave.preset("huge")
    assert ave.training_defaults("paper") == AVE_TRAINING["paper"]
    assert ave.training_defaults("paper")["lr"] == 5e-4  # the authors' train.sh
    assert ave.training_defaults(TINY)["epochs"] == AVE_TRAINING["tiny"]["epochs"]
    with pytest.raises(ValueError, match="training defaults"):
        ave.training_defaults("huge")
    assert not hasattr(TINY, "train")  # not in the model preset


def test_unbuilt_tasks_are_refused_by_name():
    with pytest.raises(NotImplementedError, match=r"task='AVQA'.*built tasks: \['ave'"):
        build_dgsct("AVQA", "tiny")


def test_build_goes_through_the_registry_and_example_inputs_fit():
    model = build_dgsct("Ave", "tiny", backend="reference")
    assert model.task == "ave"
    inputs = model.example_inputs(batch=2)
    assert inputs["frames"].shape == (2, 10, 3, 64, 64) and inputs["audio"].shape == (2, 10, 32000)
    assert torch.equal(inputs["frames"], model.example_inputs(batch=2)["frames"])  # seeded
    with torch.no_grad():
        out = model.eval()(**inputs)
    assert out["event"].shape[0] == 2 and out["is_event"].shape == (2, 10)


def test_ave_evaluator_counts_segments():
    from dgsct_kernels.models.registry import AVEEvaluator
    evaluator = get_task("ave").evaluator()
    assert isinstance(evaluator, AVEEvaluator)
    labels = torch.zeros(1, 10, 29)
    labels[0, :, 28] = 1  # all background
    outputs = {"is_event": torch.full((1, 10), -5.0), "event": torch.zeros(1, 28)}
    evaluator.add(outputs, {"labels": labels})
    result = evaluator.result()
    assert result == {"acc": 100.0, "background_acc": 100.0, "segments": 10}
