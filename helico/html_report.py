"""report.html: one self-contained page (every image embedded as base64, no script, no outside file) that a
pathologist opens with a double click. predict.py writes it for new patients; evaluate.py writes it beside
report.md. This module owns the page's markup; the numbers come from its callers.

    html = html_report.page("Diagnosis of new patients", [html_report.note(), html_report.table(header, rows), ...])
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

NOTE = ("A research tool, not a diagnostic device: its calls are not validated for clinical use and must not "
        "replace a pathologist's reading of the slide.")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%;text-align:left}
th{background:#eee}.positive{background:#fcd9d9}.negative{background:#dff2df}.nocall{background:#eee;color:#555}
.note{border:2px solid #c60;padding:.6em 1em;background:#fff6ec}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:85%;color:#444}"""


def esc(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return html.escape("" if v is None else str(v))


def note() -> str:
    return f'<p class="note"><b>{esc(NOTE)}</b></p>'


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{esc(text)}</h{level}>"


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def items(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>" if lines else ""


def _klass(v) -> str:
    s = str(v)
    return ' class="positive"' if s == "positive" else ' class="negative"' if s == "negative" else \
        ' class="nocall"' if s.startswith("no call") else ""


def table(header: list[str], rows: list[list]) -> str:
    """A table; a cell reading positive / negative / no call is colored."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{_klass(v)}>{esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(png, caption: str = "") -> str:
    """A PNG (a path or its bytes) embedded as a data URI, with its caption."""
    data = Path(png).read_bytes() if not isinstance(png, (bytes, bytearray)) else bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def page(title: str, parts: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n" + "\n".join(p for p in parts if p)
            + "\n</body></html>\n")


def decision_lines(d: dict) -> list[str]:
    """How the thresholds were chosen (decision.Decision.summary())."""
    rule = d.get("patient_rule")
    out = [f"Patch threshold {esc(d.get('patch_threshold'))}: a patch is positive at or above it (maximum F1 on the "
           f"validation windows, train.py).",
           f"Patient rule: {rule} at or above {esc(d.get('patient_threshold'))} (Youden's J on {d.get('chosen_on')})."
           if rule else "Patient rule: none (the validation part held one class only).",
           f"Patient model threshold: {esc(d.get('patient_model_threshold'))} (Youden's J on the same patients)."
           if d.get("patient_model_threshold") is not None else "No patient model.",
           f"The call comes from the {'patient model' if d.get('call_by') == 'patient_model' else 'patient rule'}: "
           f"{d.get('reason')}.",
           f"A patient with fewer than {d.get('min_patches')} readable patches gets no call."]
    if not d.get("stored_with_model", True):
        out.append("This checkpoint stores no decision: the rule was chosen on the validation part at evaluation.")
    return out


def evaluation_page(result: dict, patient_rows: list[dict], folder: Path, files: list[str]) -> str:
    """evaluate.py's report.html: its patients with their calls, the decision and every figure of the folder."""
    meta = result.get("meta", {})
    cols = ["patient", "split", "diagnosis", "n_patches", "score", "rule_call", "mil_probability", "mil_call", "call",
            "agree"]
    parts = [note(), paragraph(f"Checkpoint {meta.get('checkpoint')}; headline part: {meta.get('headline')}. The "
                               f"numbers and their intervals are in report.md and metrics.json beside this page."),
             heading("How the call is made"), items(decision_lines(meta.get("decision", {}))),
             heading("Patients"), table(cols, [[r.get(c, "") for c in cols] for r in patient_rows]),
             heading("Figures")]
    parts += [image(Path(folder) / f, f) for f in files if f.endswith(".png") and (Path(folder) / f).is_file()]
    return page("Evaluation of a patch classifier", parts)
