"""scripts/gpu_check.py's report: ``gpu_report.json`` (every value) and ``gpu_report.md`` (a table, then each stage)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, report: dict) -> None:
    """Both files, each replaced whole (written beside, then renamed), so a run cut short leaves a readable report."""
    for name, text in (("gpu_report.json", json.dumps(report, indent=1, default=str)), ("gpu_report.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def markdown(report: dict) -> str:
    """One table row per stage (status, seconds, its summary or first error line), then each stage's values."""
    lines = [f"# moetune GPU check ({report['mode']})", "", f"`{report['command']}`, started {report['started']}, "
             f"{report.get('seconds', 0):.0f} s so far.", "", "| # | stage | status | seconds | summary |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        first_error_line = s["error"].splitlines()[0] if s.get("error") else ""
        summary = s.get("summary") or s.get("reason") or first_error_line
        lines.append(f"| {s['number']} | {s['name']} | {s['status']} | {s.get('seconds', '')} | {summary.replace('|', '/')} |")
    for s in report["stages"]:
        lines += ["", f"## {s['number']}. {s['name']}: {s['status']}"]
        for key in ("reason", "error"):
            if s.get(key):
                lines += ["", "```", s[key], "```"]
        if s.get("results"):
            lines += ["", "```json", json.dumps(s["results"], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"
