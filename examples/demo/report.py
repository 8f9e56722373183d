"""The demo's results: a loss-vs-tokens plot and a table comparing Muon with AdamW."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

LABELS = {"muon": "Muon (muon_ds)", "adamw": "AdamW"}
COLORS = {"muon": "tab:red", "adamw": "tab:blue"}


def tokens_to_reach(val: list[list[float]], target: float) -> Optional[float]:
    """Tokens at which a validation curve first gets down to ``target`` (linear between points)."""
    for (t0, l0), (t1, l1) in zip(val, val[1:]):
        if l1 <= target:
            if l0 <= target:
                return t0
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected, for readable training curves."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot(histories: dict[str, dict[str, Any]], match: Optional[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        tokens, losses = zip(*history["train"])
        ax_train.plot(tokens, smooth(list(losses)), color=COLORS[name], label=LABELS[name])
        val_tokens, val_losses = zip(*history["val"])
        ax_val.plot(val_tokens, val_losses, "o-", color=COLORS[name], ms=3, label=LABELS[name])
    if "adamw" in histories:
        target = histories["adamw"]["val"][-1][1]
        ax_val.axhline(target, color=COLORS["adamw"], ls=":", lw=1, label="AdamW final")
        if match is not None:
            ax_val.axvline(match, color=COLORS["muon"], ls=":", lw=1, label="Muon reaches it")
    ax_train.set(title="training loss (smoothed)", xlabel="tokens", ylabel="cross-entropy (nats/byte)")
    ax_val.set(title="validation loss (held-out files)", xlabel="tokens", ylabel="cross-entropy (nats/byte)")
    for ax in (ax_train, ax_val):
        ax.xaxis.set_major_formatter(EngFormatter())
        last = min(h["val"][-1][1] for h in histories.values())
        first = max(h["val"][1][1] if len(h["val"]) > 1 else h["val"][0][1] for h in histories.values())
        ax.set_ylim(last - 0.1 * (first - last), first)
        ax.grid(alpha=0.3)
        ax.legend()
    some = next(iter(histories.values()))
    fig.suptitle(f"tiny Moonlight MoE ({some['parameters'] / 1e6:.2f}M params), DeepSpeed ZeRO-1, "
                 f"{some['world_size']} {some['device']} ranks, same lr and weight decay")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(out_dir: Path, optimizers: tuple[str, ...]) -> str:
    """Write plot.png, results.md and results.json under ``out_dir``; return the table."""
    histories = {name: json.loads((out_dir / f"{name}.json").read_text()) for name in optimizers}
    match = None
    if {"muon", "adamw"} <= set(histories):
        match = tokens_to_reach(histories["muon"]["val"], histories["adamw"]["val"][-1][1])
    rows = ["| optimizer | final validation loss | tokens to reach AdamW's final loss | train tokens/s | "
            "wall time |", "|---|---|---|---|---|"]
    for name, history in histories.items():
        total = history["train"][-1][0]
        if name == "adamw":
            reach = f"{total:,} (100%)"
        elif match is None:
            reach = "not reached" if "adamw" in histories else "-"
        else:
            reach = f"{match:,.0f} ({100 * match / histories['adamw']['train'][-1][0]:.0f}%)"
        rows.append(f"| {LABELS[name]} | {history['val'][-1][1]:.4f} | {reach} | "
                    f"{history['train_tokens_per_second']:,.0f} | {history['seconds']:.0f} s |")
    if "muon" in histories:
        muon, adamw = histories["muon"]["counts"]
        rows.append(f"\nMuon run: {muon} matrices -> Muon, {adamw} tensors -> AdamW.")
    table = "\n".join(rows)
    plot(histories, match, out_dir / "loss_vs_tokens.png")
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps({
        name: {"final_val_loss": h["val"][-1][1], "tokens": h["train"][-1][0], "seconds": h["seconds"]}
        for name, h in histories.items()} | {"muon_tokens_to_adamw_final": match}, indent=1))
    return table
