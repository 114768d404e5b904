"""The DG-SCT spatial attention maps of one clip, overlaid on its frames.

    python python/plot_attention.py [--task ave] [--weights FILE] [--data-root DIR]
                                    [--split test] [--video N] [--out attention.png]

One column per segment (10): the frame on top, below it the audio-guided spatial attention
map of the last stage's visual DG-SCT module (`out["spatial_maps"]["visual"]`), upsampled
to the frame size and overlaid on the de-normalised frame. Each map is scaled to its own
minimum and maximum (the maps are softmaxes over the tokens, so their absolute values
depend on the token count). Each column's title gives the ground-truth event and the
model's prediction (`segment_predictions`; "bg" is background).

Without --data-root the task's synthetic set is used; without --weights the model is
untrained. The shared helpers live in python/plot_tsne.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _load_common():
    path = Path(__file__).resolve().with_name("plot_tsne.py")
    spec = importlib.util.spec_from_file_location("dgsct_plot_tsne", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(p)
    p.add_argument("--video", type=int, default=0,
                   help="the clip's index in the split (default 0)")
    p.add_argument("--out", default="attention.png", help="the PNG to write (default "
                   "attention.png)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="the overlay's opacity, 0..1 (default 0.5)")
    args = p.parse_args(argv)
    if not 0 <= args.alpha <= 1:
        p.error(f"--alpha {args.alpha}: expected 0..1")
    common.check_common(p, args)
    return args


def denormalise(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, S, S] ImageNet-normalised -> [T, S, S, 3] in 0..1."""
    from dgsct_kernels.data.ave import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (frames.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def upsample_maps(maps: torch.Tensor, size: int) -> np.ndarray:
    """[T, H, W] -> [T, size, size], bilinear, each map scaled to 0..1 by its min and max."""
    up = F.interpolate(maps.float()[:, None], size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0]
    low = up.flatten(1).min(1).values.view(-1, 1, 1)
    high = up.flatten(1).max(1).values.view(-1, 1, 1)
    return ((up - low) / (high - low).clamp_min(1e-12)).numpy()


def clip_attention(model, dataset, index: int) -> dict:
    """One clip's frames, maps, labels and predictions."""
    from dgsct_kernels.data.ave import segment_predictions
    item = dataset[index]
    (_, out), = common.run_batches(model, dataset, [index], 1)
    frames = item["frames"]
    return {
        "frames": denormalise(frames),
        "maps": upsample_maps(out["spatial_maps"]["visual"][0], frames.shape[-1]),
        "map_size": tuple(out["spatial_maps"]["visual"].shape[-2:]),
        "truth": item["labels"].argmax(-1).tolist(),
        "pred": segment_predictions(out["is_event"].float(), out["event"].float())[0].tolist(),
        "video_id": item.get("video_id", str(index)),
    }


def _name(cls: int, names: list[str]) -> str:
    from dgsct_kernels.data.ave import BACKGROUND
    if cls == BACKGROUND:
        return "bg"
    return names[cls] if cls < len(names) else str(cls)


def plot(clip: dict, names: list[str], out: Path, *, title: str, alpha: float, dpi: int,
         colors: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(clip["frames"])
    fig, axes = plt.subplots(2, t, figsize=(1.6 * t, 4.3), squeeze=False)
    for s in range(t):
        truth, pred = clip["truth"][s], clip["pred"][s]
        wrap = lambda text: "\n".join(textwrap.wrap(text, 20)[:2])  # noqa: E731
        colour = "tab:green" if truth == pred else "tab:red"
        top, bottom = axes[0, s], axes[1, s]
        top.imshow(clip["frames"][s])
        top.set_title(f"{s}-{s + 1} s\nGT: {wrap(_name(truth, names))}", fontsize=7)
        bottom.imshow(clip["frames"][s])
        image = bottom.imshow(clip["maps"][s], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        bottom.set_title(f"pred: {wrap(_name(pred, names))}", fontsize=7, color=colour)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("frame", fontsize=8)
    axes[1, 0].set_ylabel("spatial attention", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.97, 0.95))
    bar = fig.add_axes((0.975, 0.08, 0.006, 0.35))
    fig.colorbar(image, cax=bar).ax.tick_params(labelsize=6)
    common.save_figure(fig, out, dpi, colors)
    plt.close(fig)


def main(argv=None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        task = common.check_task(args.task)
        model = common.load_model(args, task)
        dataset = common.load_dataset(args, task, model)
        if not 0 <= args.video < len(dataset):
            raise common.UsageError(f"--video {args.video}: the {args.split!r} split has "
                                    f"{len(dataset)} clips (0..{len(dataset) - 1})")
    except common.UsageError as err:
        args._parser.error(str(err))
    with common.cpu_threads(args):
        clip = clip_attention(model, dataset, args.video)
    correct = sum(a == b for a, b in zip(clip["truth"], clip["pred"]))
    weights = Path(args.weights).name if args.weights else "untrained"
    h, w = clip["map_size"]
    title = (f"{task.name.upper()} {args.preset} ({weights}), {args.split} clip {args.video} "
             f"({clip['video_id']}): last-stage visual spatial attention ({h}x{w} tokens, "
             f"per-frame min-max), {correct}/{len(clip['truth'])} segments right")
    out = Path(args.out)
    plot(clip, common.class_names(dataset), out, title=title, alpha=args.alpha, dpi=args.dpi,
         colors=args.colors)
    common.finish(args, started, out)
    return {"out": out, "correct": correct, "segments": len(clip["truth"]),
            "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main(sys.argv[1:])
