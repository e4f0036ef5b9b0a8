"""What the reports show: train.py's curves, ddt.py's histograms, eval.py's table and bar chart,
and the versions a result was made with."""

import math
import platform
import subprocess
from pathlib import Path

import torch

from plumbing.cli import UserError
from plumbing.files import atomic_write
from plumbing.metrics import curves, read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi=110):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    _pyplot().close(fig)


def plot_run(run_dir: Path) -> Path:
    """RUN/curves.png: one panel per logged quantity of RUN/metrics.jsonl."""
    plt = _pyplot()
    panels = curves(read_metrics(run_dir))
    if not panels:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: no training steps logged")
    fig, axes = plt.subplots(math.ceil(len(panels) / 2), 2, figsize=(10, 2.6 * math.ceil(len(panels) / 2)))
    for ax, (key, pts) in zip(axes.flat, panels.items()):
        lines = pts if isinstance(pts[0][1], list) else [(None, pts)]  # a panel of several named series
        for label, series in lines:
            ax.plot([p[0] for p in series], [p[1] for p in series], marker="." if len(series) < 50 else None,
                    label=label)
        if lines[0][0] is not None:
            ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    dest = run_dir / "curves.png"
    _save(fig, dest)
    return dest


def plot_scores(rows: list[dict], path) -> None:
    """Histograms of per-token φ (all responses pooled) and of z, with the N(0, 1) density z
    would follow for on-policy text."""
    plt = _pyplot()
    phi = [p for r in rows for p in r["phi_tokens"]]
    z = [r["z"] for r in rows if r["z"] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.hist(phi, bins=80, range=(-10, 5), color="tab:blue")
    a.axvline(0, color="k", lw=0.8)
    a.set(title="per-token φ = log p(y) + H", xlabel="φ_t", ylabel="tokens")
    b.hist(z, bins=30, density=True, color="tab:orange", alpha=0.8, label="data")
    lo, hi = min(-4.0, min(z, default=0.0)), max(4.0, max(z, default=0.0))
    grid = [lo + (hi - lo) * i / 199 for i in range(200)]
    b.plot(grid, [math.exp(-g * g / 2) / math.sqrt(2 * math.pi) for g in grid], "k", lw=1, label="N(0, 1): on-policy")
    b.set(title="z = Σφ / sqrt(ΣV) per response", xlabel="z", ylabel="density")
    b.legend()
    fig.tight_layout()
    _save(fig, path)


def bar_chart(results: list[dict], path: Path):
    """Accuracy with its 95% interval per model, and each model's drift KL(base ‖ model)."""
    plt = _pyplot()
    names = [r["name"] for r in results]
    acc = [r["accuracy"] for r in results]
    err = [[a - r["ci95"][0] for a, r in zip(acc, results)], [r["ci95"][1] - a for a, r in zip(acc, results)]]
    kl = [r.get("kl_from_base", {}).get("kl_token_mean") for r in results]
    panels = 2 if any(k is not None for k in kl) else 1
    fig, axes = plt.subplots(1, panels, figsize=(min(1.6 * len(names), 8) * panels + 2, 4), squeeze=False)
    axes[0, 0].bar(names, acc, yerr=err, capsize=4, color="tab:blue")
    axes[0, 0].set(ylabel="accuracy (95% Wilson CI)", ylim=(0, 1), title="Accuracy")
    if panels == 2:
        axes[0, 1].bar(names, [k or 0.0 for k in kl], color="tab:orange")
        axes[0, 1].set(ylabel="mean per-token KL(base ‖ model)", title="Drift from base")
    for ax in axes[0]:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def markdown_table(results: list[dict]) -> str:
    """eval.py's comparison of models, one row each."""
    cols = ["model", "accuracy", "95% CI", "no answer", "length limit", "repetition", "avg tokens", "tokens/s"]
    has_phi, has_kl = any("phi" in r for r in results), any("kl_from_base" in r for r in results)
    cols += ["φ mean (refs)", "z mean (refs)"] * has_phi + ["KL(base‖model)"] * has_kl
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r["name"], f"{r['accuracy']:.3f} ({r['correct']}/{r['n']})",
                 f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", fmt(r["no_answer_share"]),
                 fmt(r["length_limit_share"]), fmt(r["repetition_share"]), fmt(r["avg_output_tokens"], ".1f"),
                 fmt(r["tokens_per_s"], ".1f")]
        if has_phi:
            cells += [fmt(r["phi"]["phi_token_mean"], ".4f"), fmt(r["phi"]["z_mean"], ".2f")]
        if has_kl:
            cells.append(fmt(r.get("kl_from_base", {}).get("kl_token_mean"), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    """Python, torch and the commit of this code."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "code_commit": commit}
