"""Figures of a study, with matplotlib's object API on the Agg canvas.

    from analysis import plots
    fig = plots.frontier_plot(front)          # every trial; the frontier as a step line, labelled;
                                              # error bars where the score has an interval
    fig = plots.frontier_plot(front, price=13.63)  # and a dollars axis on top (x = gpu_hours)
    fig = plots.effects_plot(report.assess(trials))  # each direction's effect, its interval, its threshold
    fig.savefig("frontier.png", dpi=150)

Axes read at any scale: plain tick labels with the decimals the ticks need (0.0002,
0.00025 GPU-hours on a laptop; 1,200 on a cluster), never matplotlib's corner multiplier
(a bare "1e-5" that the eye misses); a log scale where a cost spans decades (trainable
parameters: 47k to 1.4M), with 10k / 1M / 7B labels; frontier labels placed where they
overlap neither each other, the legend nor the axes' edge (left out, and counted in the
title, where no place is free).

No pyplot: figures carry no global state and never open a window, so the CLI, the
tests and a study's driver can draw them anywhere. In a notebook, `%matplotlib inline`
makes a returned Figure show itself.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.pareto import Frontier
from analysis.runs import STOPPED_TAG, AnalysisError
from analysis.tables import finished, size_key
from tracking.metrics import METRICS

# Axis labels: the metrics' from tracking.metrics, the params' here.
LABELS = {**{name: m.label for name, m in METRICS.items()},
          "lr": "learning rate", "lora_rank": "LoRA rank r", "alpha_per_rank": "LoRA alpha / rank"}
LOG_DECADES = 1.5  # a cost axis spanning this many decades or more is drawn on a log scale
MARKERS = "osD^vP*Xph"


def axis_label(column: str) -> str:
    return LABELS.get(column, column)


# Settings a label names when they vary among the points drawn (the scaling paper's resolution and mixing axes).
VARYING_LABELS = {"image_size": "{:.0f}px", "mix_ratio": "mix{:g}"}


def trial_label(row, varying: tuple[str, ...] = ()) -> str:
    """Method, model size and what tells the method's trials apart (the registry says), then the `varying`
    settings of VARYING_LABELS: "lora 1m r16", or "lora 1m r16 48px mix0.2" where resolution and mixing vary."""
    from trainables.methods import METHODS

    method = row.get("method", "?")
    label = METHODS[method].label(row) if method in METHODS else str(method)
    parts = label.split(" ", 1)
    extra = [VARYING_LABELS[k].format(row.get(k)) for k in varying
             if k in VARYING_LABELS and row.get(k) is not None and row.get(k) == row.get(k)]
    return " ".join([parts[0], str(row.get("model_size", "?"))] + parts[1:] + extra)


def varying(df: pd.DataFrame) -> tuple[str, ...]:
    """The VARYING_LABELS settings that take more than one value in `df`."""
    return tuple(k for k in VARYING_LABELS if k in df and df[k].dropna().nunique() > 1)


def _figure(width: float = 7.5, height: float = 4.8):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _styles(df: pd.DataFrame):
    """A colour per method and a marker per model size, stable across the figures of one study."""
    methods = sorted(df["method"].dropna().unique()) if "method" in df else []
    sizes = sorted(df["model_size"].dropna().unique(), key=size_key) if "model_size" in df else []
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sizes)}
    return colors, markers


def _decades(values: pd.Series) -> float:
    """How many decades positive values span (0 when any is <= 0: a log axis cannot show them)."""
    values = values.dropna()
    if not len(values) or values.min() <= 0:
        return 0.0
    return math.log10(values.max() / values.min())


# From 10k up, counts read with a suffix: 7B parameters, not 7,000,000,000. (threshold, scale, suffix)
_SI = [(1e12, 1e12, "T"), (1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")]


def _decimals(values) -> int:
    """The fewest decimals that write every value exactly (to a millionth of their spacing)."""
    values = [float(v) for v in values if math.isfinite(v)]
    gaps = [abs(b - a) for a, b in zip(values, values[1:]) if b != a]
    tolerance = (min(gaps) if gaps else max(map(abs, values), default=1.0) or 1.0) * 1e-6
    return next((d for d in range(16) if all(abs(round(v, d) - v) <= tolerance for v in values)), 16)


def _unit(largest: float) -> tuple[float, str]:
    return next(((scale, suffix) for threshold, scale, suffix in _SI if abs(largest) >= threshold), (1.0, ""))


def _number(value: float, ticks) -> str:
    """`value` as one of `ticks` reads: 1,200 / 0.00025 / 12.5k / 1.5M (one suffix and one number of
    decimals for all the ticks, so that they line up)."""
    ticks = [t for t in ticks if math.isfinite(t)] or [value]
    scale, suffix = _unit(max(map(abs, ticks)))
    if value == 0:
        return "0"
    return f"{value / scale:,.{_decimals([t / scale for t in ticks])}f}{suffix}"


class PlainFormatter(Formatter):
    """Tick labels as plain numbers with the decimals the ticks need: matplotlib's ScalarFormatter moves a
    common factor into a corner label instead (a bare "1e-5" that reads as nothing), and LogFormatter
    writes 10^-4 (hand-written: no formatter of matplotlib's does both scales)."""

    locs: list = []

    def set_locs(self, locs):
        self.locs = list(locs)

    def __call__(self, x, pos=None):
        return _number(x, self.locs or [x])


def _plain_axis(axis, ticks: int | None = None) -> None:
    """Plain labels; at most `ticks` + 1 ticks at round steps (1, 2, 5: no 2.5, which costs a decimal) where
    labels are wide: seven decimals of GPU-hours side by side would run into each other."""
    if ticks is not None:
        axis.set_major_locator(MaxNLocator(nbins=ticks, steps=[1, 2, 5, 10]))
    axis.set_major_formatter(PlainFormatter())


def _log_axis(axis, decades: float) -> None:
    """Plain tick labels (0.0002, 0.0005, 0.001; 10k, 1M) on a log axis: the default 2x10^-4 minor labels collide."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _number(v, [v])))  # decades apart: each its own
    axis.set_minor_formatter(NullFormatter())


def _scale_axis(ax, which: str, values: pd.Series) -> bool:
    """Log scale where the positive values span LOG_DECADES or more, else linear; plain labels either way.
    True when the axis went log."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    decades = _decades(values)
    if decades >= LOG_DECADES:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        _log_axis(axis, decades)
        return True
    _plain_axis(axis, ticks=5 if which == "x" else None)
    return False


def dollars_axis(ax, price_per_node_hour: float):
    """A second x axis on top, in dollars at `price_per_node_hour` (the x axis must be GPU-hours per
    node; trainables' cost convention: dollars = gpu_hours x price). Returns the secondary axis."""
    price = float(price_per_node_hour)
    top = ax.secondary_xaxis("top", functions=(lambda h: h * price, lambda d: d / price))
    if ax.get_xscale() == "log":
        _log_axis(top.xaxis, 1.0)
    else:
        _plain_axis(top.xaxis, ticks=5)
    top.set_xlabel(f"cost (\\$, at \\${price:,.2f} per node-hour)")  # escaped: a dollar sign, not mathtext
    return top


def price_of(trials: pd.DataFrame) -> float | None:
    """The one price per node-hour the trials were costed at (their `price_per_node_hour` param, else
    dollars / gpu_hours), or None when they have none or several."""
    if "price_per_node_hour" in trials and trials["price_per_node_hour"].notna().any():
        prices = trials["price_per_node_hour"].dropna().astype(float).unique()
    elif {"dollars", "gpu_hours"} <= set(trials.columns):
        both = trials[(trials["gpu_hours"] > 0) & trials["dollars"].notna()]
        prices = (both["dollars"] / both["gpu_hours"]).round(6).unique()
    else:
        return None
    return float(prices[0]) if len(prices) == 1 else None


def frontier_plot(front: Frontier, x: str | None = None, y: str | None = None, title: str | None = None,
                  price: float | None = None) -> Figure:
    """Every considered trial (colour = method, marker = model size), frontier trials ringed and
    labelled, and for two objectives the frontier as a step: the best score reachable for a budget.
    `title` (e.g. the study's name) goes before the counts in the figure's title. `price` (dollars per
    node-hour) adds a dollars axis on top when x is `gpu_hours` (see `price_of`). Trials stopped early
    (taking part only with `frontier(..., include_stopped=True)`) are crossed. Where y has a 95% interval
    (`<y>_ci_low`, `<y>_ci_high`) it is drawn as an error bar, and the points significantly dominated
    (`contender` False, analysis.pareto) are drawn hollow, the others filled."""
    x = x or front.costs[0]
    y = y or next((c for c, d in front.objectives.items() if d == "max"), front.costs[-1])
    df = front.considered
    df = df.assign(**{c: "?" for c in ("method", "model_size") if c not in df})  # frames made by hand
    colors, markers = _styles(df)
    fig, ax = _figure()
    ends = [y + "_ci_low", y + "_ci_high"]
    bars = df[df[ends].notna().all(axis=1)] if set(ends) <= set(df.columns) else df.iloc[0:0]
    dominated = (df["contender"].eq(False).fillna(False).astype(bool) if "contender" in df
                 else pd.Series(False, index=df.index))
    for (method, size), group in df.groupby(["method", "model_size"], sort=False):
        style = {"marker": markers[size], "s": 36}
        if len(shown := bars.loc[bars.index.intersection(group.index)]):
            ax.errorbar(shown[x], shown[y], yerr=[shown[y] - shown[ends[0]], shown[ends[1]] - shown[y]], fmt="none",
                        ecolor=colors[method], elinewidth=0.8, capsize=2, alpha=0.45, zorder=1)
        filled, hollow = group[~dominated[group.index]], group[dominated[group.index]]
        ax.scatter(filled[x], filled[y], c=colors[method], alpha=0.75, linewidths=0, **style)
        if len(hollow):
            ax.scatter(hollow[x], hollow[y], facecolors="none", edgecolors=colors[method], linewidths=1, **style)
    stopped = df[df[STOPPED_TAG].notna()] if STOPPED_TAG in df else df.iloc[0:0]
    if len(stopped):
        ax.scatter(stopped[x], stopped[y], marker="x", c="black", s=24, linewidths=0.8, zorder=3)
    on = df.loc[front.frontier.index]  # cheapest first
    ax.scatter(on[x], on[y], s=110, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    if len(front.objectives) == 2 and len(on) > 0:
        ax.step(on[x], on[y], where="post", color="black", linewidth=1, zorder=2)
    _scale_axis(ax, "x", df[x])
    _plain_axis(ax.yaxis)
    ax.set_xlabel(axis_label(x) + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(axis_label(y))
    if price is not None and x == "gpu_hours":
        dollars_axis(ax, price)
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color="grey", marker=mk, linestyle="", label=s) for s, mk in markers.items()]
    handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", label="frontier"))
    if len(bars):
        handles.append(Line2D([], [], color="grey", marker="|", markersize=10, linestyle="", label="95% interval"))
    if dominated.any():
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="",
                              label="significantly dominated"))
    if len(stopped):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="stopped early"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # never over a point
    ax.grid(True, alpha=0.3)
    left_out = sum(front.excluded.values())
    points = "configurations (seed means)" if front.over_seeds else "trials"
    heading = (f"{title}: " if title else "") + f"Pareto frontier, {len(on)} of {len(df)} {points}" \
        + (f" ({left_out} unfinished or incomplete left out)" if left_out else "")
    ax.set_title(_wrapped(heading), fontsize=10)
    unlabelled = _place_labels(fig, ax, on[x].to_numpy(), on[y].to_numpy(),
                               [trial_label(r, varying(df)) for _, r in on.iterrows()])
    if unlabelled:
        ax.set_title(_wrapped(heading + f"; {unlabelled} frontier label{'s' * (unlabelled != 1)} left out for "
                              "room"), fontsize=10)
    return fig


def _wrapped(title: str, width: int = 64) -> str:
    """A title in lines that fit above the axes (the legend beside them narrows them): a long study name and
    its counts were cut at the figure's left edge."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width))


# Where a label may sit relative to its point (points, alignment), nearest first: beside it, then above and
# below; no farther, or it would read as another point's label.
_OFFSETS = [(dx, dy, "left" if dx > 0 else "right") for dy in (4, -12, 16, -24, 28, -36) for dx in (6, -6)]
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7}


def _place_labels(fig: Figure, ax, xs, ys, texts) -> int:
    """Annotate points so that no label overlaps another or the legend, or leaves the axes; a label
    with no free place in _OFFSETS is left out. Returns how many were left out.

    The layout is computed once and then frozen, so where a label is measured is where it is drawn.
    """
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    left_out = 0
    for px, py, text in zip(xs, ys, texts):
        ann = ax.annotate(text, (px, py), fontsize=7.5, textcoords="offset points", xytext=_OFFSETS[0][:2],
                          ha="left", bbox=_LABEL_BOX)
        for dx, dy, ha in _OFFSETS:
            ann.xyann = (dx, dy)
            ann.set_ha(ha)
            box = ann.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
        else:
            ann.remove()
            left_out += 1
    return left_out


def rank_plot(trials: pd.DataFrame) -> Figure:
    """Score against LoRA rank, one line (the best trial per rank) and its trials per model size."""
    df = finished(trials)
    df = df[df["lora_rank"].notna()] if "lora_rank" in df else df.iloc[0:0]  # tidy blanked it where it does not apply
    fig, ax = _figure()
    _, markers = _styles(df)
    for i, (size, group) in enumerate(sorted(df.groupby("model_size"), key=lambda kv: size_key(kv[0]))):
        best = group.groupby("lora_rank")["score"].max()
        ax.scatter(group["lora_rank"], group["score"], color=f"C{i}", marker=markers[size], alpha=0.35, s=24)
        ax.plot(best.index.astype(float), best.to_numpy(), color=f"C{i}", marker=markers[size],
                label=f"{size} (best per rank)")
    if df.empty:
        ax.text(0.5, 0.5, "no LoRA / QLoRA trials", ha="center", va="center", transform=ax.transAxes)
    else:
        ranks = sorted(df["lora_rank"].dropna().astype(int).unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(title="model size", fontsize=8)
    ax.set_xlabel(axis_label("lora_rank") + " (log scale)")
    ax.set_ylabel(axis_label("score"))
    _plain_axis(ax.yaxis)
    ax.set_title("Score vs LoRA rank", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


def lr_plot(trials: pd.DataFrame) -> Figure:
    """Score against learning rate (log scale), colour = model size, marker = method."""
    df = finished(trials)
    fig, ax = _figure()
    _, markers = _styles(df)
    methods = sorted(df["method"].unique()) if "method" in df else []
    for i, size in enumerate(sorted(df["model_size"].unique(), key=size_key) if not df.empty else []):
        for j, method in enumerate(methods):
            g = df[(df["model_size"] == size) & (df["method"] == method)]
            if len(g):
                ax.scatter(g["lr"], g["score"], color=f"C{i}", marker=MARKERS[j % len(MARKERS)], s=32,
                           label=f"{size} {method}")
    ax.set_xscale("log")
    _log_axis(ax.xaxis, _decades(df["lr"]) if not df.empty else 1.0)
    ax.set_xlabel(axis_label("lr") + " (log scale)")
    ax.set_ylabel(axis_label("score"))
    _plain_axis(ax.yaxis)
    ax.set_title("Score vs learning rate", fontsize=10)
    if not df.empty:
        ax.legend(title="model size, method", fontsize=8)
    ax.grid(True, alpha=0.3, which="both")
    return fig


def stage_cost_plot(trials: pd.DataFrame, by: tuple[str, ...] = ("model_size", "method")) -> Figure:
    """Mean GPU-hours per node of stage 1 and stage 2, stacked, per model size x method."""
    df = finished(trials)
    for col in ("stage1_gpu_hours", "stage2_gpu_hours", *by):
        if not df.empty and col not in df:
            raise AnalysisError(f"unknown column {col!r}: the trials have no per-stage cost")
    fig, ax = _figure()
    if df.empty:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
        return fig
    means = df.groupby(list(by))[["stage1_gpu_hours", "stage2_gpu_hours"]].mean().reset_index()
    means = means.sort_values(list(by), key=lambda s: s.map(size_key) if s.name == "model_size" else s)
    names = [" ".join(str(v) for v in row) for row in means[list(by)].itertuples(index=False)]
    ax.bar(names, means["stage1_gpu_hours"], label="stage 1 (projector; cached, shared)", color="C7")
    ax.bar(names, means["stage2_gpu_hours"], bottom=means["stage1_gpu_hours"], label="stage 2 (tuning)",
           color="C0")
    if len(names) > 4:  # names side by side would run into each other
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_ha("right")
    ax.set_ylabel("GPU-hours per node (mean per trial)")
    _plain_axis(ax.yaxis)
    ax.set_xlabel(" x ".join(by))
    ax.set_title("Cost per stage", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


VERDICT_COLORS = {"holds": "tab:green", "not resolved": "tab:orange", "does not hold": "tab:red"}


def effects_plot(effects: pd.DataFrame) -> Figure:
    """A forest plot of analysis.report.assess's table: per direction (top to bottom) its effect in score
    points with its 95% interval, coloured by verdict, and the claim's finite bounds (`low`, `high`) as
    short dashed lines; a direction not measured says so in place of a point."""
    fig, ax = _figure(8.0, 0.5 * len(effects) + 1.6)
    rows = range(len(effects))
    for i, r in zip(rows, effects.itertuples()):
        if pd.isna(r.effect):
            ax.text(0.02, i, f"not measured: {r.note}", transform=ax.get_yaxis_transform(), va="center", fontsize=7.5,
                    color="grey")
            continue
        for bound in (r.low, r.high):
            if math.isfinite(bound):
                ax.plot([bound, bound], [i - 0.35, i + 0.35], color="black", linestyle="--", linewidth=1)
        ax.errorbar(r.effect, i, xerr=[[r.effect - r.effect_ci_low], [r.effect_ci_high - r.effect]], fmt="o",
                    color=VERDICT_COLORS.get(r.verdict, "grey"), capsize=3)
    ax.axvline(0, color="grey", linewidth=0.6)
    ax.set_yticks(list(rows), [f"{r.direction}. {r.finding}" for r in effects.itertuples()], fontsize=8)
    ax.set_ylim(len(effects) - 0.5, -0.5)  # the first direction on top
    ax.set_xlabel("effect (score points, 0-100 scale): A - B with its 95% interval")
    _plain_axis(ax.xaxis)
    handles = [Line2D([], [], color=c, marker="o", label=v) for v, c in VERDICT_COLORS.items()]
    handles.append(Line2D([], [], color="black", linestyle="--", label="the claim's bound"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("The papers' directions: effect and 95% interval", fontsize=10)
    return fig
