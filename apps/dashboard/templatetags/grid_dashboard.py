"""Template filters for the dashboard: ages, durations, rates and short hashes."""

from __future__ import annotations

import datetime as dt

from django import template
from django.utils import timezone

from apps.inference.models import InferenceJob

register = template.Library()


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@register.filter
def ago(moment: dt.datetime | None) -> str:
    """'4.2 s ago' for a recent time, 'never' for None."""
    if moment is None:
        return "never"
    return f"{_span(max(0.0, (timezone.now() - moment).total_seconds()))} ago"


@register.filter
def latency(job: InferenceJob) -> str:
    """Time from a job's creation to its end, or '' while it runs."""
    if job.finished is None:
        return ""
    return milliseconds((job.finished - job.created).total_seconds() * 1000)


@register.filter
def milliseconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


@register.filter
def per_second(value: float) -> str:
    return f"{value:.2f}/s" if value < 10 else f"{value:.1f}/s"


@register.filter
def short_hash(value: str) -> str:
    """Return the first 12 hex digits of a SHA-256, enough to tell versions apart."""
    return value[:12]


@register.filter
def failovers(job: InferenceJob) -> int:
    """Times the job moved to another node: every attempt after the first."""
    return max(0, job.attempts - 1)


@register.filter
def size(value: int) -> str:
    """Format a byte count in B, KiB, MiB or GiB."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB"):
        if amount < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


@register.filter
def shape(dims: list[int | None]) -> str:
    """Format a tensor shape as '(?, 1, 8, 8)', with '?' for a dynamic dimension."""
    if not isinstance(dims, list):
        return ""
    return "(" + ", ".join("?" if dim is None else str(dim) for dim in dims) + ")"
