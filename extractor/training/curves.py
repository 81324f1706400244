"""Loss and F1 curves (PNG) from a training run's metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def draw_curves(metrics_path: Path, out_dir: Path) -> None:
    from extractor.scoring.report.charts import pyplot
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    dev = [r for r in evals if "dev_loss" in r]
    if dev:
        ax.plot([r["step"] for r in dev], [r["dev_loss"] for r in dev], "o-", label="dev loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    scored = [r for r in evals if "micro_f1" in r]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in scored]
        ax.plot(steps, [r["micro_f1"] for r in scored], "o-", label="dev micro F1")
        ax.plot(steps, [r["macro_f1"] for r in scored], "s--", label="dev macro F1")
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("F1")
        ax.legend()
        fig.savefig(out_dir / "f1.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
