"""t-SNE of a model's pooled audio and visual features, with and without its DG-SCT modules.

    python python/plot_tsne.py [--task ave] [--weights FILE] [--data-root DIR] [--split test]
                               [--out tsne.png]

The paper's qualitative comparison: one point per segment that holds an event, coloured by
its class, in four panels (audio / visual features x DG-SCT off / on). "Off" is the same
model with every DG-SCT module's residual switched off (`dgsct_off`: gates set to 0), which
makes the encoders' outputs equal to the plain frozen encoders'. Each panel's title gives
the silhouette score of the classes in the features themselves (higher: better separated).

Without --data-root the task's small synthetic set is used (written once to a cache
folder, as `python -m dgsct_kernels.train` does). Without --weights the model is untrained
and the picture shows nothing learned. The helpers here (`dgsct_off`, `load_model`,
`load_dataset`) are shared with python/plot_attention.py.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dgsct_kernels import FusedDGSCT
from dgsct_kernels.models import build_dgsct, get_task, task_names

PICTURE_TASKS = ("ave",)  # tasks whose labels are [T, classes + background] one-hot


# ---------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def dgsct_off(model: torch.nn.Module):
    """Switch every DG-SCT module of `model` off inside the `with` block.

    Each `FusedDGSCT` returns `gate * (adapter output)` as the residual its caller adds,
    and its prompt attention adds `gate_av * (...)` inside the module. Both are set to 0
    (the modules' initial values), so every residual is exactly zero and the encoders
    compute what the plain frozen encoders compute. The original values are restored on
    exit, also when the block raises. A module built without a gate (`use_gate=False`)
    cannot be switched off this way: `ValueError` names it, before anything changes.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, FusedDGSCT)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no FusedDGSCT modules to switch off")
    ungated = [name for name, m in modules if m.gate is None]
    if ungated:
        raise ValueError(f"DG-SCT modules without a gate (use_gate=False) cannot be switched "
                         f"off by zeroing it: {ungated}")
    saved = [(m.gate.detach().clone(), m.gate_av.detach().clone()) for _, m in modules]
    try:
        with torch.no_grad():
            for _, m in modules:
                m.gate.zero_()
                m.gate_av.zero_()
        yield model
    finally:
        with torch.no_grad():
            for (_, m), (gate, gate_av) in zip(modules, saved):
                m.gate.copy_(gate)
                m.gate_av.copy_(gate_av)


class UsageError(ValueError):
    """A bad command-line argument; `main` turns it into argparse's error message."""


def check_task(name: str):
    """The registry's task, or UsageError naming the known and the supported ones."""
    try:
        task = get_task(name)
    except ValueError as err:
        raise UsageError(f"--task {name!r}: unknown; known tasks: {task_names()}") from err
    if task.name not in PICTURE_TASKS:
        raise UsageError(f"--task {name!r}: not supported by the pictures: its labels are not "
                         f"per-segment one-hot classes with a background column; supported: "
                         f"{list(PICTURE_TASKS)} (known tasks: {task_names()})")
    if not task.built:
        raise UsageError(f"--task {name!r}: no model is built for it here; built tasks: "
                         f"{task_names(built=True)}")
    return task


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="ave", help="the task (default ave; known: "
                   f"{', '.join(task_names())})")
    p.add_argument("--preset", default="tiny", help="the model preset (default tiny)")
    p.add_argument("--weights", default=None,
                   help="a trained model's file (e.g. ave_tiny_best.safetensors from "
                        "python/train_ave.py); without it the model is untrained")
    p.add_argument("--data-root", default=None,
                   help="the task's data root in the authors' layout; default: its synthetic set")
    p.add_argument("--synthetic-videos", default=None,
                   help="train,val,test clips of the synthetic set (without --data-root; "
                        "default: the task's)")
    p.add_argument("--split", default="test", help="the split to draw clips from (default test)")
    p.add_argument("--backend", default="auto", help="the DG-SCT backend (default auto)")
    p.add_argument("--dpi", type=int, default=100, help="the PNG's resolution (default 100)")
    p.add_argument("--colors", type=int, default=0,
                   help="write a palette PNG of at most this many colours, 2..256 (smaller "
                        "files); default 0: full colour")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores other processes leave free)")


def check_common(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dpi < 10:
        p.error(f"--dpi {args.dpi}: expected >= 10")
    if args.colors and not 2 <= args.colors <= 256:
        p.error(f"--colors {args.colors}: expected 0 (full colour) or 2..256")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: expected >= 1")
    args._parser = p


@contextlib.contextmanager
def cpu_threads(args):
    """torch, BLAS and OpenMP threads at --threads, or at the cores other processes leave
    free (a thread sharing a busy core stalls the others: dgsct_kernels.cpu_load); the
    caller's settings are restored on exit."""
    from threadpoolctl import threadpool_limits

    from dgsct_kernels.cpu_load import busy_cores, threads_beside
    before = torch.get_num_threads()
    n = args.threads if args.threads is not None else threads_beside(busy_cores(0.2), before)
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield n
    finally:
        torch.set_num_threads(before)


def save_figure(fig, out: Path, dpi: int, colors: int = 0) -> None:
    """fig as a PNG at `out` (its folder made), quantised to a palette of `colors` if set."""
    import io

    from PIL import Image
    out.parent.mkdir(parents=True, exist_ok=True)
    if not colors:
        fig.savefig(out, dpi=dpi, format="png")
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(
            out, format="PNG", optimize=True)


def load_model(args, task) -> torch.nn.Module:
    """build_dgsct with --weights (or untrained, with a warning), in eval mode."""
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights!r}: no such file")
    if args.weights is None:
        warnings.warn("no --weights given: the model is untrained (random DG-SCT modules and "
                      "head), so the picture shows nothing learned", stacklevel=2)
    try:
        task.preset(args.preset)
    except ValueError as err:
        raise UsageError(f"--preset {args.preset!r}: {err}") from err
    model = build_dgsct(task.name, args.preset, weights=args.weights, backend=args.backend)
    return model.eval()


def load_dataset(args, task, model):
    """The task's dataset for --split, from --data-root or the synthetic set."""
    from dgsct_kernels.train import prepare_data
    if args.data_root is not None:
        if not Path(args.data_root).is_dir():
            raise UsageError(f"--data-root {args.data_root!r}: not a directory")
        videos = None
    else:
        videos = args.synthetic_videos or ",".join(map(str, task.synthetic["videos_per_split"]))
        try:
            counts = tuple(int(v) for v in videos.split(","))
        except ValueError:
            counts = ()
        if len(counts) != 3 or min(counts) < 0 or sum(counts) == 0:
            raise UsageError(f"--synthetic-videos {videos!r}: expected three non-negative "
                             "integers train,val,test, not all zero")
    root = prepare_data(argparse.Namespace(data_root=args.data_root, synthetic_videos=videos),
                        task, rank=0, world=1)
    try:
        dataset = task.dataset(root, args.split, image_size=model.image_size)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise UsageError(f"--split {args.split!r} of {root}: {err}") from err
    if len(dataset) == 0:
        raise UsageError(f"--split {args.split!r} of {root}: no clips")
    return dataset


def class_names(dataset) -> list[str]:
    from dgsct_kernels.data.ave import AVE_CATEGORIES
    return list(getattr(dataset, "categories", AVE_CATEGORIES))


def run_batches(model, dataset, indices, batch_size: int):
    """Yield (batch items, outputs) for the clips `indices`, in batches, without gradients."""
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        inputs = {name: torch.stack([item[name] for item in items]) for name in model.input_names}
        with torch.no_grad():
            yield items, model(**inputs)


def finish(args, started: float, out: Path) -> None:
    size = out.stat().st_size
    print(f"took {time.perf_counter() - started:.1f} s; wrote {out} ({size / 1024:.0f} KB)")


# ---------------------------------------------------------------------------- t-SNE


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--out", default="tsne.png", help="the PNG to write (default tsne.png)")
    p.add_argument("--max-clips", type=int, default=0,
                   help="use at most this many clips of the split (default 0: all)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per forward (default 4)")
    p.add_argument("--perplexity", type=float, default=30.0,
                   help="t-SNE perplexity (default 30; lowered for few points)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE's random state (default 0)")
    args = p.parse_args(argv)
    check_common(p, args)
    if args.max_clips < 0:
        p.error(f"--max-clips {args.max_clips}: expected >= 0")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: expected >= 1")
    if args.perplexity <= 0:
        p.error(f"--perplexity {args.perplexity}: expected > 0")
    return args


def collect_features(model, dataset, max_clips: int = 0, batch_size: int = 4) -> dict:
    """Pooled features of every event segment, with DG-SCT on and off, and their classes."""
    from dgsct_kernels.data.ave import BACKGROUND
    n = len(dataset) if not max_clips else min(max_clips, len(dataset))
    indices = list(range(n))
    feats = {(m, s): [] for m in ("audio", "visual") for s in ("on", "off")}
    classes = []
    for state in ("on", "off"):
        context = dgsct_off(model) if state == "off" else contextlib.nullcontext()
        with context:
            for items, out in run_batches(model, dataset, indices, batch_size):
                labels = torch.stack([item["labels"] for item in items]).argmax(-1)  # [B, T]
                event = labels.ne(BACKGROUND)
                for modality in ("audio", "visual"):
                    feats[modality, state].append(out["features"][modality][event].float())
                if state == "on":
                    classes.append(labels[event])
    result = {key: torch.cat(value).numpy() for key, value in feats.items()}
    result["classes"] = torch.cat(classes).numpy()
    result["clips"] = n
    return result


def embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE
    n = features.shape[0]
    perplexity = min(perplexity, max(1.0, (n - 1) / 3))  # t-SNE needs perplexity < n
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                ).fit_transform(features.astype(np.float64))


def silhouette(features: np.ndarray, classes: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score
    if not 2 <= len(np.unique(classes)) < len(classes):
        return None
    return float(silhouette_score(features, classes))


def plot(data: dict, names: list[str], out: Path, *, title: str, perplexity: float, seed: int,
         dpi: int, colors: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = data["classes"]
    present = sorted(np.unique(classes).tolist())
    cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.2), squeeze=False)
    for row, modality in enumerate(("audio", "visual")):
        for col, state in enumerate(("off", "on")):
            ax = axes[row, col]
            feats = data[modality, state]
            xy = embed(feats, perplexity, seed)
            for k, cls in enumerate(present):
                pick = classes == cls
                ax.scatter(xy[pick, 0], xy[pick, 1], s=14, color=cmap(k % cmap.N),
                           label=names[cls] if cls < len(names) else str(cls),
                           edgecolors="none", alpha=0.85)
            score = silhouette(feats, classes)
            scored = f"silhouette {score:.2f}" if score is not None else "silhouette n/a"
            ax.set_title(f"{modality} features, DG-SCT {state}\n({scored})", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9,
               frameon=False, markerscale=1.5)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, out, dpi, colors)
    plt.close(fig)


def main(argv=None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        task = check_task(args.task)
        model = load_model(args, task)
        dataset = load_dataset(args, task, model)
    except UsageError as err:
        args._parser.error(str(err))
    with cpu_threads(args):
        data = collect_features(model, dataset, args.max_clips, args.batch_size)
        points = len(data["classes"])
        if points < 5:
            raise SystemExit(f"plot_tsne: only {points} event segments in {data['clips']} clips "
                             f"of --split {args.split!r}; t-SNE needs at least 5 (raise "
                             "--max-clips)")
        weights = Path(args.weights).name if args.weights else "untrained"
        title = (f"{task.name.upper()} {args.preset} ({weights}): t-SNE of pooled features, "
                 f"{points} event segments of {data['clips']} {args.split} clips")
        out = Path(args.out)
        plot(data, class_names(dataset), out, title=title, perplexity=args.perplexity,
             seed=args.seed, dpi=args.dpi, colors=args.colors)
    finish(args, started, out)
    return {"out": out, "points": points, "clips": data["clips"],
            "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main(sys.argv[1:])
