import math

from django import template

register = template.Library()


@register.filter
def num(value, digits=2):
    """A figure with ``digits`` decimals, or an em dash when it is missing or undefined (nan)."""
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "—"  # missing (None, or "" from a template lookup that found nothing), or nan
    return f"{value:.{int(digits)}f}"


@register.filter
def label(name) -> str:
    """An identifier as a heading: "instruction_following" -> "Instruction following"."""
    text = str(name).replace("_", " ")
    return text[:1].upper() + text[1:]


@register.filter
def get(mapping, key):
    return (mapping or {}).get(key)


@register.filter
def headline(run) -> dict:
    """A run's headline score as ``leaderboard.headline_score`` gives it (no queries)."""
    from evalhub.leaderboard import headline_score

    return headline_score(run) if run.metrics is not None else {}


@register.filter
def duration(seconds) -> str:
    """Seconds as "2 h 05 min", "3 min 20 s" or "45 s"; an em dash when unknown."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "—"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


@register.simple_tag
def home_dashboard() -> dict:
    """The researcher home page's panels (``evalhub.dashboard``)."""
    from evalhub.dashboard import dashboard

    return dashboard()


@register.filter
def pretty_json(value) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values from at or below lo to at or above hi, about `count` steps of 1, 2 or
    5 times a power of ten."""
    raw = ((hi - lo) or 1.0) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(k * step, 10) for k in range(first, max(last, first + 1) + 1)]


@register.simple_tag
def interval_plot(rows, width: int = 640):
    """An SVG of preference ratings with their 95% intervals, best first, over an axis with
    ticks; each row labelled with its model and vote count."""
    from django.utils.html import format_html, format_html_join

    rated = [r for r in rows if r.get("rating")]
    if not rated:
        return ""
    lo = min(r["rating"]["ci_low"] for r in rated)
    hi = max(r["rating"]["ci_high"] for r in rated)
    ticks = nice_ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]
    span = hi - lo
    x = lambda v: 200 + (width - 230) * (v - lo) / span  # noqa: E731
    parts = []
    for i, r in enumerate(rated):
        y, g = 20 + 24 * i, r["rating"]
        label = f"{r['model']} ({r.get('votes', 0)} votes)"
        parts.append((y + 4, label, x(g["ci_low"]), y, x(g["ci_high"]), y, x(g["rating"]), y))
    body = format_html_join(
        "",
        '<text x="4" y="{}" font-size="12">{}</text><line x1="{}" y1="{}" x2="{}" y2="{}" '
        'stroke="#2f6fed" stroke-width="2"/><circle cx="{}" cy="{}" r="4" fill="#2f6fed"/>',
        parts,
    )
    axis_y = 20 + 24 * len(rated)
    axis = format_html_join(
        "",
        '<line class="tick" x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#999"/>'
        '<text x="{0}" y="{3}" font-size="11" text-anchor="middle">{4}</text>',
        [(f"{x(t):.1f}", axis_y, axis_y + 5, axis_y + 18, f"{t:g}") for t in ticks],
    )
    return format_html(
        '<svg class="plot" width="{}" height="{}" role="img" aria-label="preference ratings">'
        '{}<line class="axis" x1="200" y1="{}" x2="{}" y2="{}" stroke="#999"/>{}'
        '<text x="{}" y="{}" font-size="11" text-anchor="end">Bradley-Terry rating '
        "(Elo scale), 95% interval</text></svg>",
        width,
        axis_y + 40,
        body,
        axis_y,
        width - 30,
        axis_y,
        axis,
        width - 30,
        axis_y + 34,
    )


@register.simple_tag
def curve_plot(curve, width: int = 640, height: int = 180, name: str = "loss"):
    """An SVG line of a training curve: {"step": [...], "loss": [...]} or {"step": [...],
    "value": [...]}, with its range and last step written beside it."""
    from django.utils.html import format_html

    steps = curve.get("step") or []
    values = curve.get("value", curve.get("loss")) or []
    pairs = [
        (s, v)
        for s, v in zip(steps, values, strict=False)  # a curve being written may be uneven
        if isinstance(v, int | float) and math.isfinite(v)
    ]
    if len(pairs) < 2:
        return ""
    lo, hi = min(v for _, v in pairs), max(v for _, v in pairs)
    s0, s1 = pairs[0][0], pairs[-1][0]
    points = " ".join(
        f"{40 + (width - 50) * (s - s0) / max(s1 - s0, 1):.1f},"
        f"{10 + (height - 30) * (1 - (v - lo) / ((hi - lo) or 1)):.1f}"
        for s, v in pairs
    )
    return format_html(
        '<svg class="plot" width="{}" height="{}" role="img" aria-label="{} curve">'
        '<polyline fill="none" stroke="#2f6fed" stroke-width="2" points="{}"/>'
        '<text x="2" y="14" font-size="11">{}</text><text x="2" y="{}" font-size="11">{}</text>'
        '<text x="{}" y="{}" font-size="11" text-anchor="end">step {}</text>'
        "</svg>",
        width,
        height,
        name,
        points,
        f"{hi:.4g}",
        height - 20,
        f"{lo:.4g}",
        width - 4,
        height - 4,
        s1,
    )


@register.simple_tag
def bpw_plot(rows, width: int = 480, height: int = 220):
    """An SVG scatter of KL to the original (y) against bits per weight (x) for a model and
    its compressed versions (``evalhub.compression.compression_table``), axes labelled."""
    from django.utils.html import format_html, format_html_join

    points = [
        (r["bpw"], (r["quality"] or {}).get("kl", 0.0), r["model"].name)
        for r in rows
        if r["bpw"] is not None
    ]
    if len(points) < 2:
        return ""
    x_hi = max(p[0] for p in points) or 1.0
    y_hi = max(p[1] for p in points) or 1.0
    x = lambda v: 50 + (width - 70) * v / x_hi  # noqa: E731
    y = lambda v: height - 30 - (height - 50) * v / y_hi  # noqa: E731
    dots = format_html_join(
        "",
        '<circle cx="{}" cy="{}" r="4" fill="#2f6fed"><title>{}: {} bpw, KL {}</title></circle>',
        [(f"{x(b):.1f}", f"{y(k):.1f}", name, f"{b:.2f}", f"{k:.4f}") for b, k, name in points],
    )
    return format_html(
        '<svg class="plot" width="{}" height="{}" role="img" aria-label="KL against bits per '
        'weight"><line x1="50" y1="{}" x2="{}" y2="{}" stroke="#999"/><line x1="50" y1="20" '
        'x2="50" y2="{}" stroke="#999"/>{}<text x="{}" y="{}" font-size="11" '
        'text-anchor="end">bits per weight (max {})</text><text x="4" y="14" '
        'font-size="11">KL to original (max {})</text></svg>',
        width,
        height,
        height - 30,
        width - 10,
        height - 30,
        height - 30,
        dots,
        width - 10,
        height - 8,
        f"{x_hi:.2f}",
        f"{y_hi:.4f}",
    )
