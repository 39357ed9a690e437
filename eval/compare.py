"""`--compare old.json`: what changed between two results files of a suite, metric by metric."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--compare {path}: no such file; expected a results JSON written by --out")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"--compare {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"--compare {path}: expected a results file with a 'metrics' object (python -m eval ... --out)")
    return data


def compare(new: dict[str, Any], old: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric in either file: {"metric", "old", "new", "delta"} (None where a side lacks it)."""
    rows = []
    for key in list(new["metrics"]) + [k for k in old["metrics"] if k not in new["metrics"]]:
        a, b = old["metrics"].get(key), new["metrics"].get(key)
        delta = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append({"metric": key, "old": a, "new": b, "delta": delta})
    return rows


def format_comparison(rows: list[dict[str, Any]], old_name: str, new_name: str = "this run") -> str:
    def number(value, signed=False):
        if value is None:
            return "–"
        return f"{value:+.4f}" if signed else f"{value:.4f}"

    lines = [f"| metric | {old_name} | {new_name} | change |", "|---|---:|---:|---:|"]
    lines += [f"| {r['metric']} | {number(r['old'])} | {number(r['new'])} | {number(r['delta'], True)} |"
              for r in rows]
    return "\n".join(lines)
