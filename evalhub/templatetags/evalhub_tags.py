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
def get(mapping, key):
    return (mapping or {}).get(key)


@register.filter
def pretty_json(value) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@register.simple_tag
def interval_plot(rows, width: int = 640):
    """An SVG of preference ratings with their 95% intervals, best first."""
    from django.utils.html import format_html, format_html_join

    rated = [r for r in rows if r.get("rating")]
    if not rated:
        return ""
    lo = min(r["rating"]["ci_low"] for r in rated)
    hi = max(r["rating"]["ci_high"] for r in rated)
    span = (hi - lo) or 1.0
    x = lambda v: 160 + (width - 180) * (v - lo) / span  # noqa: E731
    parts = []
    for i, r in enumerate(rated):
        y, g = 20 + 24 * i, r["rating"]
        parts.append((y + 4, r["model"], x(g["ci_low"]), y, x(g["ci_high"]), y, x(g["rating"]), y))
    body = format_html_join(
        "",
        '<text x="4" y="{}" font-size="12">{}</text><line x1="{}" y1="{}" x2="{}" y2="{}" '
        'stroke="#2f6fed" stroke-width="2"/><circle cx="{}" cy="{}" r="4" fill="#2f6fed"/>',
        parts,
    )
    return format_html(
        '<svg class="plot" width="{}" height="{}" role="img" '
        'aria-label="preference ratings">{}</svg>',
        width,
        30 + 24 * len(rated),
        body,
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
