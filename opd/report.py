"""`runs/<name>/report.html`: one page to open after a run, self-contained (figures inline as SVG, no scripts).

What it shows, all read from the run directory: the summary the driver prints (student and teacher accuracy,
held-out reverse and forward KL, first and last evaluation), the learning curves (training loss and both KLs per
step, held-out KLs and accuracies per evaluation, response length, step time by phase), the checkpoints, the data
counts and the resolved config. The driver writes it at the end of a run; `opd report RUN_DIR` (or
`python -m opd.programs.report RUN_DIR`) writes it again for any run directory, finished or not.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path

from opd.metrics import atomic_path, read_jsonl

PHASES = (("timing/rollout_s", "rollout"), ("timing/teacher_s", "teacher"), ("timing/train_s", "learner"),
          ("timing/overlap_wait_s", "overlap wait"), ("timing/sync_s", "weight sync"))


def _figure(draw, width: float = 6.0, height: float = 3.2) -> str:
    """An inline SVG of what `draw(ax)` plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(width, height))
    draw(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue: the SVG sits inside the HTML


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _curves(steps: list[dict], evals: list[dict]) -> list[tuple[str, str]]:
    figures = []

    def training(ax):
        for key in ("loss", "kl/reverse/mean", "kl/forward/mean", "kl/reverse/sampled_mean"):
            x, y = _series(steps, key)
            if x:
                ax.plot(x, y, label=key, linewidth=1, linestyle=":" if key == "loss" else "-")
        values = [v for r in steps for k, v in r.items() if k in ("loss", "kl/reverse/mean", "kl/forward/mean")]
        ax.set(xlabel="step", yscale="log" if values and min(values) > 0 else "linear")
        ax.legend(fontsize=8)

    def held_out_kl(ax):
        for key in ("eval/kl/reverse/mean", "eval/kl/forward/mean"):
            x, y = _series(evals, key)
            ax.plot(x, y, marker="o", label=key.removeprefix("eval/"))
        ax.set(xlabel="step", yscale="log" if all(v > 0 for r in evals for k, v in r.items()
                                                    if k.startswith("eval/kl/")) else "linear")
        ax.legend(fontsize=8)

    def accuracy(ax):
        x, y = _series(evals, "eval/accuracy/student")
        ax.plot(x, y, marker="o", label="student")
        _, teacher = _series(evals, "eval/accuracy/teacher")
        if teacher:
            ax.axhline(teacher[0], color="gray", linestyle="--", label="teacher")
        ax.set(xlabel="step", ylim=(0, 1.05))
        ax.legend(fontsize=8)

    def length(ax):
        for key in ("response/length/mean", "response/length/max"):
            x, y = _series(steps, key)
            ax.plot(x, y, label=key.removeprefix("response/"), linewidth=1)
        ax.set(xlabel="step", ylabel="tokens")
        ax.legend(fontsize=8)

    def step_time(ax):
        x = [r["step"] for r in steps]
        bottom = [0.0] * len(steps)
        for key, label in PHASES:
            if steps and key in steps[0]:
                y = [r.get(key, 0.0) for r in steps]
                ax.bar(x, y, bottom=bottom, label=label, width=1.0)
                bottom = [b + v for b, v in zip(bottom, y, strict=True)]
        ax.set(xlabel="step", ylabel="seconds")
        ax.legend(fontsize=8)

    if steps:
        figures.append(("Training loss and KL to the teacher (per step)", _figure(training)))
    if evals:
        figures.append(("Held-out KL to the teacher (student's own samples)", _figure(held_out_kl)))
        figures.append(("Held-out task accuracy (greedy)", _figure(accuracy)))
    if steps:
        figures.append(("Response length", _figure(length)))
        figures.append(("Step time by phase", _figure(step_time)))
    return figures


def _summary(evals: list[dict]) -> list[tuple[str, str, str]]:
    if not evals:
        return []
    first, last = evals[0], evals[-1]

    def pct(v):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"

    rows = [("student accuracy", pct(first.get("eval/accuracy/student")), pct(last.get("eval/accuracy/student"))),
            ("teacher accuracy", pct(first.get("eval/accuracy/teacher")), pct(last.get("eval/accuracy/teacher")))]
    for key, label in (("eval/kl/reverse/mean", "held-out reverse KL"), ("eval/kl/forward/mean", "held-out forward KL")):
        if key in first:
            rows.append((label, f"{first[key]:.4f}", f"{last[key]:.4f}"))
    return rows


def _checkpoints(run_dir: Path) -> list[tuple[str, str, str]]:
    rows = []
    for path in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[-1])):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        state = path / "run_state.json"
        version = json.loads(state.read_text()).get("policy_version", "") if state.exists() else ""
        rows.append((path.name, f"{size / 2**20:.1f} MiB", str(version)))
    return rows


def _table(head: tuple[str, ...], rows: list[tuple]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; text-align: left; } td { font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.5em; } figcaption { font-weight: 600; margin-bottom: 0.3em; }
figure svg { width: 100%; height: auto; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
"""


def build(run_dir: Path) -> str:
    """The report's HTML for `run_dir`."""
    from opd.configfile import to_yaml
    from opd.overrides import config_from_dict

    run_dir = Path(run_dir)
    steps = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    evals = read_jsonl(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").exists() else []
    config = config_from_dict(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    counts = (json.loads((run_dir / "data_counts.json").read_text())
              if (run_dir / "data_counts.json").exists() else {})
    parts = [f"<h1>{html.escape(run_dir.name)}</h1>",
             f"<p class='sub'>{html.escape(config.model.student)} ← {html.escape(config.model.teacher)} · "
             f"loss {config.loss.kind} · mode {config.run.mode} · {len(steps)} of {config.train.steps} steps done</p>"]
    if evals:
        parts += ["<h2>Summary</h2>",
                  _table(("", f"step {evals[0]['step']}", f"step {evals[-1]['step']}"), _summary(evals))]
    if steps:
        step_s = [r["timing/step_s"] for r in steps if "timing/step_s" in r]
        if step_s:
            parts.append(f"<p>Mean step time {sum(step_s) / len(step_s):.2f} s over {len(step_s)} steps "
                         f"({sum(step_s):.0f} s in all).</p>")
    figures = _curves(steps, evals)
    if figures:
        parts += ["<h2>Learning curves</h2>", "<div class='grid'>"]
        parts += [f"<figure><figcaption>{html.escape(t)}</figcaption>{svg}</figure>" for t, svg in figures]
        parts.append("</div>")
    checkpoints = _checkpoints(run_dir)
    parts += ["<h2>Checkpoints</h2>",
              _table(("checkpoint", "size", "policy version"), checkpoints) if checkpoints else "<p>none</p>"]
    if counts:
        parts += ["<h2>Data</h2>", _table(("count", "value"), sorted(counts.items()))]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(to_yaml(config))}</pre>"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run_dir.name)} — opd report"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write(run_dir: Path) -> Path:
    path = Path(run_dir) / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(build(run_dir))
    return path
