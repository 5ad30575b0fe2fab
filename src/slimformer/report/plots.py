"""Trade-off scatter plots rendered to SVG text with matplotlib.

matplotlib is imported inside the function so that ``import slimformer`` stays
fast. Figures are built with the object API on an Agg canvas, which leaves
pyplot's global state (and any interactive backend) untouched.
"""

from __future__ import annotations

import io


def plot_tradeoff(
    points: list[tuple[str, float, float]],
    front: list[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str = "perplexity",
    logx: bool = False,
) -> str:
    """Scatter ``points`` (name, x, y), label each by name, draw the Pareto
    ``front`` as a step line with its points highlighted; return SVG text."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    on_front = set(front)
    # Fixed hash salt and no date: the same data gives byte-identical SVG.
    with matplotlib.rc_context({"svg.hashsalt": "slimformer", "svg.fonttype": "path"}):
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()

        others = [p for p in points if p[0] not in on_front]
        frontier = sorted((p for p in points if p[0] in on_front), key=lambda p: (p[1], p[2]))
        if others:
            ax.scatter([p[1] for p in others], [p[2] for p in others],
                       s=30, color="#9aa5b1", zorder=2, label="dominated")
        if frontier:
            xs, ys = [p[1] for p in frontier], [p[2] for p in frontier]
            # "post": the front stays at a point's y until the next, cheaper-in-y point.
            ax.step(xs, ys, where="post", color="#d9480f", linewidth=1.5, zorder=3)
            ax.scatter(xs, ys, s=60, marker="*", color="#d9480f", zorder=4,
                       label="Pareto frontier")

        # Alternate label offsets (by x order) so neighbouring labels collide less.
        for i, (name, x, y) in enumerate(sorted(points, key=lambda p: p[1])):
            ax.annotate(name, (x, y), xytext=(5, 5 if i % 2 == 0 else -11),
                        textcoords="offset points", fontsize=8,
                        parse_math=False)  # a "$" in a name is text, not mathtext

        # Before any log scaling, which cannot handle a zero-width range.
        xs = {p[1] for p in points}
        if len(xs) == 1:  # one x value: give the axis a real span (log needs it)
            x = xs.pop()
            if logx:
                ax.set_xlim(x / 2, x * 2)
            else:
                half = abs(x) / 2 or 1.0
                ax.set_xlim(x - half, x + half)
        if logx:
            ax.set_xscale("log")
            # Plain numbers ("200") instead of the default 2x10^2 on major and minor ticks.
            for setter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                setter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.margins(x=0.12, y=0.12)  # room for the name labels at the edges
        ax.set_title(title, parse_math=False)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if points:
            ax.legend(loc="best", fontsize=8)

        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()
