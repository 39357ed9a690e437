"""What a run tells its user: log.jsonl (one JSON object per line, read back tolerantly), TensorBoard scalars,
a progress bar with an ETA, and the loss curve as a picture. Rank 0 writes; the other ranks' logs are no-ops."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from .files import append_jsonl, read_jsonl, rewrite_jsonl


class RunLog:
    def __init__(self, output: Path, enabled: bool, purge_step: int | None = None, tensorboard: bool = True):
        self.enabled, self.path, self.writer = enabled, Path(output) / "log.jsonl", None
        if not (enabled and tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(output) / "tb"), purge_step=purge_step)
        except ImportError:
            print("note: TensorBoard logs are off: `pip install tensorboard` to write them", file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_jsonl(self.path, record)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Keeps the records of steps up to `step` (those after it were written after the checkpoint a resume
    starts from, and are written again) and drops a torn last line; returns the kept records."""
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= step]
    if Path(path).is_file():
        rewrite_jsonl(path, kept)
    return kept


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """tqdm with an ETA; None when off (other ranks, --no-progress)."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def plot_losses(history: list[dict[str, Any]], path: Path, key: str = "task") -> Path | None:
    """One curve per `key` value (raw losses faint, a running mean over them), x = step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("note: no loss curve: `pip install matplotlib` to draw it", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in sorted({str(h.get(key, "loss")) for h in history}):
        points = [(h["step"], h["loss"]) for h in history
                  if str(h.get(key, "loss")) == name and math.isfinite(h["loss"])]
        if not points:
            continue
        steps, losses = zip(*points)
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        line, = ax.plot(steps[window - 1:], smooth, label=name)
        ax.plot(steps, losses, alpha=0.25, color=line.get_color(), linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"loss per {key}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
