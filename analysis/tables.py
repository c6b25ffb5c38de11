"""The summary as a table: one set of formatted cells, rendered as aligned text (terminal) or Markdown."""

from __future__ import annotations

import math

import pandas as pd

FIRST_METRICS = ("forgetting", "val/phase1_loss")  # shown first among the extra metrics (hybrids.training.forgetting)
MAX_EXTRA_METRICS = 4  # further final metrics beyond the objective, as means; summary.csv has them all


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def fmt_number(value, digits: int = 4) -> str:
    """A metric value to `digits` significant digits; "-" for a missing one."""
    if is_missing(value):
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.{digits}g}"


def human_bytes(value) -> str:
    """1536 -> "1.5 KiB"."""
    if is_missing(value):
        return "-"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(value) -> str:
    """1_234_567 -> "1.23M"."""
    if is_missing(value):
        return "-"
    value = float(value)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _spread(row: pd.Series) -> str:
    if is_missing(row.get("mean")):
        return "-"
    std = row.get("std")
    return fmt_number(row["mean"]) if is_missing(std) else f"{fmt_number(row['mean'])} ± {fmt_number(std, 2)}"


def _extra_metrics(summary: pd.DataFrame) -> list[str]:
    names = [c.removesuffix(" mean") for c in summary.columns if c.endswith(" mean") and c != "duration_s mean"]
    first = [n for n in FIRST_METRICS if n in names]  # a two-phase study's forgetting must not fall off the table
    return [*first, *(n for n in names if n not in first)][:MAX_EXTRA_METRICS]


def table_cells(summary: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]], list[bool]]:
    """The summary's headers, cells (one row per configuration, best first) and which columns are numeric.

    Args:
        summary: a `summary_frame`; with a "setting" column (task settings, see analysis.arms), its rows
            grouped by setting, best first within each: the rank counts within the setting.
        metric: the objective's name, for its column header.
    """
    has = summary.columns
    show_layout = "layout" in has and any(  # a label "layout=6M:A*" already says it
        str(g) not in (str(layout), f"layout={layout}")
        for g, layout in zip(summary["group"], summary["layout"], strict=True))
    settings = summary["setting"] if "setting" in has else pd.Series("", index=summary.index)
    ranks = settings.groupby(settings, sort=False).cumcount() + 1
    columns: list[tuple[str, bool, object]] = [
        ("rank", True, lambda i, r: str(ranks.iloc[i]) if not is_missing(r.get("mean")) else "-"),
        ("configuration", False, lambda i, r: str(r["group"])),
    ]
    if "setting" in has:
        columns.insert(0, ("setting", False, lambda i, r: str(r["setting"])))
    if show_layout:
        columns.append(("layout", False, lambda i, r: "-" if is_missing(r["layout"]) else str(r["layout"])))
    if "n_invocations" in has:
        columns.append(("invocations", True, lambda i, r: fmt_number(r["n_invocations"])))
    if "params_unique" in has:
        columns.append(("params", True, lambda i, r: human_count(r["params_unique"])))
    if "kv_bytes" in has:
        columns.append(("KV cache", True, lambda i, r: human_bytes(r["kv_bytes"])))
    columns += [
        ("seeds", True, lambda i, r: str(r["n"])),
        (f"{metric} (mean ± std)", True, lambda i, r: _spread(r)),
        ("min", True, lambda i, r: fmt_number(r["min"])),
        ("max", True, lambda i, r: fmt_number(r["max"])),
    ]
    if (summary["pruned"] > 0).any() or (summary["failed"] > 0).any():
        columns.append(("pruned/failed", True, lambda i, r: f"{r['pruned']}/{r['failed']}"))
    for name in _extra_metrics(summary):
        columns.append((name, True, lambda i, r, name=name: fmt_number(r[f"{name} mean"])))
    headers = [name for name, _, _ in columns]
    rows = [[cell(i, row) for _, _, cell in columns] for i, (_, row) in enumerate(summary.iterrows())]
    return headers, rows, [numeric for _, numeric, _ in columns]


def _md_cell(text: str, code: bool) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text != "-" else text


def markdown_table(headers: list[str], rows: list[list[str]], numeric: list[bool]) -> str:
    """A GitHub-flavoured Markdown table; text columns (configurations, arms, layouts) as code, so that "A*" stays."""
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
             "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"]
    code = [h in ("configuration", "layout", "arm", "architecture") for h in headers]
    lines += ["| " + " | ".join(_md_cell(c, k) for c, k in zip(row, code, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[str]], numeric: list[bool]) -> str:
    """Aligned plain text for a terminal: numbers right-aligned, text left-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])
