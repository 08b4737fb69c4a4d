"""Metrics, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Metric:
    """One measured figure. ``ok`` is None for a figure that is only reported."""

    section: str
    name: str
    value: float | None
    unit: str
    shown: str
    goal: str = ""
    ok: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "error"
        if self.ok is None:
            return "info"
        return "pass" if self.ok else "miss"


def _show(value: float, fmt: str, unit: str) -> str:
    text = fmt.format(value)
    return f"{text} {unit}" if unit and unit not in ("x",) else f"{text}{unit}"


def info(section: str, name: str, value: float, unit: str, fmt: str = "{:.3g}",
         **detail: Any) -> Metric:
    return Metric(section, name, value, unit, _show(value, fmt, unit), detail=detail)


def at_most(section: str, name: str, value: float, unit: str, limit: float,
            fmt: str = "{:.3g}", **detail: Any) -> Metric:
    return Metric(section, name, value, unit, _show(value, fmt, unit),
                  goal=f"<= {_show(limit, fmt, unit)}", ok=value <= limit, detail=detail)


def at_least(section: str, name: str, value: float, unit: str, limit: float,
             fmt: str = "{:.3g}", **detail: Any) -> Metric:
    return Metric(section, name, value, unit, _show(value, fmt, unit),
                  goal=f">= {_show(limit, fmt, unit)}", ok=value >= limit, detail=detail)


def within(section: str, name: str, value: float, unit: str, target: float,
           tolerance: float, fmt: str = "{:.3g}", **detail: Any) -> Metric:
    ok = abs(value - target) <= tolerance * target
    return Metric(section, name, value, unit, _show(value, fmt, unit),
                  goal=f"{_show(target, fmt, unit)} +- {tolerance:.0%}", ok=ok, detail=detail)


def failed(section: str, name: str, error: str) -> Metric:
    return Metric(section, name, None, "", "-", goal="", ok=False, detail={"error": error})


def table(metrics: Sequence[Metric]) -> str:
    headers = ("section", "metric", "value", "goal", "result")
    rows = [(m.section, m.name, m.shown, m.goal or "-", m.verdict) for m in metrics]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths,
                                                                 strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _clean(obj: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, header: dict[str, Any], metrics: Sequence[Metric]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**header, "metrics": [{**asdict(m), "result": m.verdict} for m in metrics]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
