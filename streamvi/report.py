"""PNG plots of a snapshot: the training history, the latent space and inputs beside reconstructions.

The latent map and the reconstructions need records to encode: given ``data`` (``--input``), those;
otherwise the held-out sample the snapshot keeps (streamvi/snapshots/sample.py), so a snapshot alone
gives all three pictures.

Drawn with matplotlib's Agg renderer through ``Figure`` objects (no pyplot, no display, no global
state), so reports can be written from a server, a container or a test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from streamvi.datasets import Dataset
from streamvi.errors import StreamVIError
from streamvi.model.mixed import FeatureInputs
from streamvi.model.vae import VAE
from streamvi.snapshots.sample import load_sample
from streamvi.snapshots.store import SnapshotInfo
from streamvi.training.history import FIELDS, StepHistory

HISTORY_PNG = "history.png"
LATENTS_PNG = "latents.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"

_TITLES = {
    "elbo": "ELBO (nats per record, higher is better)",
    "kl": "KL(q(z|x) || p(z)) (nats per record)",
    "reconstruction": "reconstruction E_q[log p(x|z)] (nats per record)",
}


@dataclass(frozen=True)
class Report:
    """The files a report wrote and what went into them."""

    files: list[Path]
    history_points: int
    records_encoded: int
    #: Where the encoded records came from ("" when none were).
    records_from: str = ""


def _history(info: SnapshotInfo) -> StepHistory:
    history = StepHistory.from_meta(info.meta)
    if len(history) == 0 and info.meta.get("metrics"):
        # a snapshot written before histories were kept: plot at least its last step
        history.add(info.step, info.meta["metrics"])
    return history


def plot_history(history: StepHistory, path: Path, title: str = "") -> Path:
    """ELBO, KL and reconstruction per step, one panel each, sharing the step axis."""
    figure = Figure(figsize=(9, 8), layout="constrained")
    axes = figure.subplots(len(FIELDS), 1, sharex=True)
    steps = np.asarray(history.steps, dtype=np.float64)
    for ax, name in zip(axes, FIELDS, strict=True):
        values = np.asarray(history.values[name], dtype=np.float64)
        ax.plot(steps, values, lw=0.8, color="tab:blue", marker="." if len(steps) < 50 else None)
        if len(values) >= 20:
            window = max(5, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.8, color="tab:orange", label=f"mean of {window}")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(_TITLES[name], fontsize="medium")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step" + (f" (every {history.stride}th)" if history.stride > 1 else ""))
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return path


def _project_2d(z: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Coordinates to draw: z itself in 2-D, the first two principal components above, index below."""
    if z.shape[1] == 1:
        return np.column_stack([np.arange(z.shape[0]), z[:, 0]]), "record", "z"
    if z.shape[1] == 2:
        return z, "z[0]", "z[1]"
    centred = z - z.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / max(float(np.sum(singular**2)), 1e-12)
    xy = centred @ vt[:2].T
    return xy, f"PC 1 ({explained[0]:.0%} of variance)", f"PC 2 ({explained[1]:.0%})"


def plot_latents(
    z_mean: np.ndarray,
    labels: np.ndarray | None,
    path: Path,
    title: str = "",
    scores: np.ndarray | None = None,
    score_name: str = "ELBO (nats)",
) -> Path:
    """Posterior means in 2-D (principal components when latent_dim > 2), coloured by label if
    any, else by each record's ``scores`` (its bound: low = unusual) if given."""
    xy, xlabel, ylabel = _project_2d(np.asarray(z_mean, dtype=np.float64))
    figure = Figure(figsize=(8, 7), layout="constrained")
    ax = figure.add_subplot()
    if labels is None and scores is not None:
        values = np.asarray(scores, dtype=np.float64)
        finite = np.isfinite(values)
        points = ax.scatter(xy[finite, 0], xy[finite, 1], c=values[finite], s=10, alpha=0.8, cmap="viridis")
        figure.colorbar(points, ax=ax, label=score_name)
    elif labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6, color="tab:blue")
    else:
        classes = sorted({str(v) for v in labels.tolist()})
        codes = np.asarray([classes.index(str(v)) for v in labels.tolist()])
        cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis"
        points = ax.scatter(xy[:, 0], xy[:, 1], c=codes, s=6, alpha=0.7, cmap=cmap)
        if len(classes) <= 20:
            handles, _ = points.legend_elements(num=len(classes))
            ax.legend(handles, classes, title="label", loc="best", fontsize="small", markerscale=1.5)
        else:
            figure.colorbar(points, ax=ax, label="label index")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title or "latent space: posterior means")
    figure.savefig(path, dpi=100)
    return path


def plot_reconstructions(
    x: np.ndarray, x_hat: np.ndarray, path: Path, title: str = "", ylabel: str = "", profiles: bool = False
) -> Path:
    """Inputs beside their reconstructions: as images when input.dim is a square (unless
    ``profiles``), else as profiles labelled ``ylabel``, a value not observed (NaN in ``x``) marked
    at its reconstruction."""
    n = x.shape[0]
    side = math.isqrt(x.shape[1])
    square = side * side == x.shape[1] and side > 1 and not profiles
    columns = 4
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(2.4 * columns * (2 if square else 1.5), 2.4 * rows), layout="constrained")
    if square:
        grid = figure.subplots(rows, 2 * columns, squeeze=False)
        low, high = float(min(np.nanmin(x), x_hat.min())), float(max(np.nanmax(x), x_hat.max()))
        for i in range(rows * columns):
            left, right = grid[i // columns][2 * (i % columns)], grid[i // columns][2 * (i % columns) + 1]
            for ax in (left, right):
                ax.set_xticks([])
                ax.set_yticks([])
            if i >= n:
                left.set_axis_off()
                right.set_axis_off()
                continue
            left.imshow(x[i].reshape(side, side), cmap="gray_r", vmin=low, vmax=high)
            right.imshow(x_hat[i].reshape(side, side), cmap="gray_r", vmin=low, vmax=high)
            if i < columns:
                left.set_title("input", fontsize="small")
                right.set_title("reconstruction", fontsize="small")
    else:
        _draw_profiles(figure, x, x_hat, rows, columns)
        if ylabel:
            figure.supylabel(ylabel, fontsize="small")
    figure.suptitle(title or "inputs beside reconstructions (decoder mean at the posterior mean)")
    figure.savefig(path, dpi=100)
    return path


def _draw_profiles(figure: Figure, x: np.ndarray, x_hat: np.ndarray, rows: int, columns: int) -> None:
    """One panel per record: its values by dimension, the reconstruction, and red crosses at the
    reconstruction of each value not observed; one legend for all."""
    grid = figure.subplots(rows, columns, squeeze=False)
    for i in range(rows * columns):
        ax = grid[i // columns][i % columns]
        if i >= x.shape[0]:
            ax.set_axis_off()
            continue
        ax.plot(x[i], lw=1.0, marker=".", markersize=3, label="input")
        ax.plot(x_hat[i], lw=1.0, label="reconstruction")
        masked = np.flatnonzero(np.isnan(x[i]))
        if masked.size:
            ax.scatter(masked, x_hat[i][masked], marker="x", s=18, color="tab:red", label="not observed")
        ax.set_xticks([])
    handles: dict[str, Any] = {}
    for ax in grid.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        grid[0][0].legend(list(handles.values()), list(handles), fontsize="x-small")


def heldout_sample(info: SnapshotInfo) -> Dataset | None:
    """The held-out records ``info`` keeps, as a dataset (None when it keeps none)."""
    sample = load_sample(info)
    if sample is None or len(sample[0]) == 0:
        return None
    x, c = sample
    return Dataset(x=x, ids=[f"heldout-{i}" for i in range(len(x))], context=c if c.shape[1] else None)


def write_report(
    info: SnapshotInfo, out: str | Path, data: Dataset | None = None, limit: int = 2000, examples: int = 16
) -> Report:
    """Write the history plot, the latent-space plot and the reconstructions into ``out``.

    The last two encode ``data``, or without it the snapshot's held-out sample; a snapshot that
    keeps none (written with evaluation.heldout_fraction=0 or snapshots.sample_records=0) gives the
    history alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history = _history(info)
    name = f"{info.path.name} (step {info.step})"
    files = [plot_history(history, out / HISTORY_PNG, f"training history: {name}")]
    records_from = "the input given"
    if data is None:
        data = heldout_sample(info)
        records_from = f"the snapshot's held-out sample ({len(data) if data is not None else 0} records)"
    if data is None or len(data) == 0:
        return Report(files, len(history), 0)

    from streamvi.snapshots.loading import load_trainer

    settings, trainer = load_trainer(info)
    if data.x.shape[1] != settings.input.dim:
        raise StreamVIError(
            f"the report's input rows have {data.x.shape[1]} values, "
            f"the snapshot's model expects {settings.input.dim}"
        )
    x = data.x[:limit]
    c = data.context[:limit] if data.context is not None else None
    if c is None and settings.input.context_dim:
        raise StreamVIError(
            "the snapshot's model needs a context 'c' per record; the report's input has none"
        )
    labels = data.labels[:limit] if data.labels is not None else None
    scores = trainer.evaluate(x, c)
    files.append(
        plot_latents(
            scores.z_loc,
            labels,
            out / LATENTS_PNG,
            f"latent space: {name}, {x.shape[0]} records from {records_from}",
            scores=scores.bound,
            score_name=f"{trainer.estimator.bound_name} (nats per record)",
        )
    )
    n = min(examples, x.shape[0])
    x_hat = reconstruct(trainer.model, scores.z_loc[:n], None if c is None else c[:n])
    shown, ylabel, inputs = x[:n], "", trainer.model.inputs
    if isinstance(inputs, FeatureInputs):  # raw values on many scales (and NaN): make them comparable
        shown, x_hat, ylabel = comparable(inputs, shown), comparable(inputs, x_hat), COMPARABLE_UNITS
    title = f"inputs beside reconstructions (decoder mean at the posterior mean), from {records_from}"
    path = out / RECONSTRUCTIONS_PNG
    features = isinstance(inputs, FeatureInputs)
    files.append(plot_reconstructions(shown, x_hat, path, title, ylabel, profiles=features))
    return Report(files, len(history), int(x.shape[0]), records_from)


#: What the reconstructions of a feature-schema model are drawn in.
COMPARABLE_UNITS = "numeric: standardised; count: log(1 + n); binary, class index: as is"


def comparable(inputs: FeatureInputs, x: np.ndarray) -> np.ndarray:
    """Feature-schema rows (raw values, NaN where not observed) on one scale, so that a feature in
    thousands does not flatten those in thousandths: numeric values standardised by the snapshot's
    normaliser, counts as log(1 + n), binaries and class indices as they are."""
    layout = inputs.layout
    loc, scale = (np.asarray(v.numpy(), dtype=np.float64) for v in inputs.location_scale())
    out = np.array(x, dtype=np.float64)
    out[:, layout.numeric] = (out[:, layout.numeric] - loc) / scale
    out[:, layout.count] = np.log1p(out[:, layout.count])
    return out


def reconstruct(model: VAE, z: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """The decoder's mean E[x|z, c] at latents ``z`` (probabilities for Bernoulli data).

    For Gumbel-softmax latents ``z`` holds class probabilities, the mean of the one-hot code.
    """
    context = tf.zeros((z.shape[0], 0)) if c is None else tf.constant(c, dtype=tf.float32)
    mean = model.observation(tf.constant(z, dtype=tf.float32), context).mean()
    return np.asarray(tf.cast(mean, tf.float32).numpy())


def describe(files: Sequence[Path], report: Report | None = None) -> str:
    """One line per file written, for the CLI, and where the encoded records came from."""
    lines = [f"wrote {path}" for path in files]
    if report is not None and report.records_encoded:
        lines.append(f"encoded {report.records_encoded} records from {report.records_from}")
    elif report is not None:
        lines.append(
            "no latents.png or reconstructions.png: the snapshot keeps no held-out sample "
            "(it was written with evaluation.heldout_fraction=0 or snapshots.sample_records=0); "
            "pass --input to encode records"
        )
    return "\n".join(lines)
