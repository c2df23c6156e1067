"""How a run reports beyond its console: TensorBoard (`--report-to tensorboard`) and
the loss-curve PNG written beside `metrics.json` at the end of every run.

Both are checked or imported lazily: a run without `--report-to` never imports
tensorboard, and matplotlib is imported only to draw (Agg backend, no display,
no pyplot global state, so the server can render a running job's curve in a
handler thread).
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any, Sequence

from qlora_serve.errors import InvalidArgument

LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "runs"  # OUT/runs: `tensorboard --logdir OUT/runs`
_PNG_SIZE_IN, _PNG_DPI = (8.0, 6.0), 100  # 800 x 600 pixels, ~50 KiB whatever the run's length


def tensorboard_available() -> bool:
    """What transformers' TensorBoardCallback needs: tensorboard (or tensorboardX) importable."""
    return any(_importable(name) for name in ("tensorboard", "tensorboardX"))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
        return False


def check_report_to(report_to: str) -> None:
    """InvalidArgument before anything loads when the chosen integration is not installed."""
    if report_to == "tensorboard" and not tensorboard_available():
        raise InvalidArgument("report_to = tensorboard needs the tensorboard package, which is not installed: "
                              "pip install tensorboard (or pip install 'qlora-serve[tensorboard]'), or report_to = none")


def report_callbacks(report_to: str, out: Path) -> list:
    """Trainer callbacks for `report_to`: HF's TensorBoardCallback writing event files to
    OUT/runs (a resumed run appends there, so TensorBoard shows one run)."""
    if report_to != "tensorboard":
        return []
    from transformers.integrations import TensorBoardCallback

    cb = TensorBoardCallback()
    cb.logging_dir = str(out / TENSORBOARD_DIR)  # its default would be OUT/checkpoints/runs/<time>_<host>
    return [cb]


def render_loss_curve(log: Sequence[dict[str, Any]], title: str = "", best_step: int | None = None) -> bytes:
    """A PNG (bytes) of a metrics log (metrics.json's "log"): train and eval loss (nats)
    against the optimizer step on top, the learning rate below; `best_step` (the kept
    checkpoint of --keep-best) is marked. An empty log gives a PNG saying so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in log if e.get("event") == "log" and e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in log if e.get("event") == "eval" and e.get("eval_loss") is not None]
    lrs = [(e["step"], e["learning_rate"]) for e in log if e.get("event") == "log" and e.get("learning_rate") is not None]
    fig = Figure(figsize=_PNG_SIZE_IN, dpi=_PNG_DPI)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        loss_ax.plot(*zip(*train), label="train loss", color="tab:blue", marker="." if len(train) < 50 else None)
    if evals:
        loss_ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o")
    if best_step is not None:
        loss_ax.axvline(best_step, color="gray", linestyle="--", label=f"kept: step {best_step}")
    if not (train or evals):
        loss_ax.text(0.5, 0.5, "no logged step yet", ha="center", va="center", transform=loss_ax.transAxes)
    else:
        loss_ax.legend(loc="upper right")
    loss_ax.set_ylabel("loss (nats)")
    loss_ax.grid(True, alpha=0.3)
    if title:
        loss_ax.set_title(title)
    if lrs:
        lr_ax.plot(*zip(*lrs), color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(True, alpha=0.3)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_loss_curve(log: Sequence[dict[str, Any]], path: Path, title: str = "", best_step: int | None = None) -> Path:
    """Render `log` (see render_loss_curve) to `path`, atomically."""
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(render_loss_curve(log, title, best_step))
    tmp.replace(path)
    return path
