"""Reports from saved measurements: ``report.md``, a self-contained ``report.html`` and PNG plots.

Every job (demo, compress, planner) saves its measurements as JSON in its directory (``report.json``, or
``compress.json`` for a recipe run); :func:`write_report` renders them, so ``torchslim report DIR`` rebuilds the
same report later without running anything. The report data::

    {"title": str, "intro": [str], "baseline": name of the reference row,
     "results": [{"name", "artifact", "runtime", "measurement": Measurement.to_dict(), ...}],
     "sweeps": {"tau": [ThresholdRow.to_dict()], "bits": [SweepRow.to_dict()]},       # optional
     "planner": {"points": [{"label", "file_bytes", "accuracy", ...}], "front": [i], "chosen": i}}  # optional
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from torchslim.errors import TorchSlimError
from torchslim.fileio import atomic_write_text
from torchslim.measure import plots
from torchslim.prune.sweep import ThresholdRow, plot_threshold_sweep

__all__ = ["COLUMNS", "ReportFiles", "load_report_data", "row_cells", "with_ratios", "write_report"]

COLUMNS = [
    "artifact", "accuracy", "file bytes", "ratio", "params", "nonzero", "bits/weight", "MACs",
    "b1 ms", "b32 ms", "speedup b1", "speedup b32", "runtime", "deployed route", "deployed b1", "deployed b32",
]
REPORT_FILE = "report.json"
COMPRESS_FILE = "compress.json"


class ReportFiles(dict):
    """Paths written by :func:`write_report`: ``markdown``, ``html``, ``json`` and ``plots`` (a list)."""


def with_ratios(results: list[dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """Add ``ratio_vs_baseline`` and ``speedup_b1``/``speedup_b32`` to each result (against ``baseline``'s row).

    Args:
        results: entries with a ``measurement`` dict.
        baseline: the name of the reference row (default: the first).

    Returns:
        The same list (changed in place).
    """
    if not results:
        return results
    base = next((r for r in results if r["name"] == baseline), results[0])["measurement"]
    for r in results:
        m = r["measurement"]
        r["ratio_vs_baseline"] = _ratio(base.get("artifact_bytes"), m.get("artifact_bytes"))
        for batch in ("1", "32"):
            r[f"speedup_b{batch}"] = _ratio(_median(base, batch), _median(m, batch))
    return results


def row_cells(r: dict[str, Any]) -> list[str]:
    """One table row (formatted strings, in :data:`COLUMNS` order) for a result with ratios."""
    m = r["measurement"]
    accuracy = "-" if m.get("accuracy") is None else f"{m['accuracy']:.2%}"
    macs = "-" if not m.get("macs") else f"{m['macs']:,}"
    b1, b32 = _median(m, "1"), _median(m, "32")
    return [
        r["name"], accuracy, _int(m.get("artifact_bytes")), _times(r.get("ratio_vs_baseline")),
        _int(m.get("parameters")), _int(m.get("nonzero_parameters")), f"{m.get('bits_per_weight', 0):.2f}", macs,
        "-" if b1 is None else f"{b1:.3f}", "-" if b32 is None else f"{b32:.3f}",
        _times(r.get("speedup_b1")), _times(r.get("speedup_b32")), r.get("runtime", "torch"),
        *_deployed(r.get("deploy")),
    ]


def _deployed(entry: dict[str, Any] | None) -> list[str]:
    """Route, speedup b1, speedup b32 of a row's ``deploy`` entry (``-`` when it was not deployed)."""
    if not entry:
        return ["-", "-", "-"]
    speedup = entry.get("speedup", {})
    return [entry.get("route", "-"), _times(speedup.get("1")), _times(speedup.get("32"))]


def load_report_data(directory: str | Path) -> dict[str, Any]:
    """Read the saved measurements of a job directory (``report.json`` or a recipe run's ``compress.json``).

    Args:
        directory: a directory written by the demo, ``compress`` or the planner.

    Returns:
        The report data (see the module docstring), ratios included.

    Raises:
        TorchSlimError: the directory holds neither file, or the file is not valid JSON.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise TorchSlimError(f"report: {str(folder)!r} is not a directory: expected the output directory of "
                             "torchslim demo or torchslim compress")
    for name in (REPORT_FILE, COMPRESS_FILE):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise TorchSlimError(f"report: {str(path)!r} is not valid JSON ({exc})") from exc
            if name == COMPRESS_FILE:
                data = _from_compress_state(data)
            with_ratios(data.get("results", []), data.get("baseline"))
            return data
    raise TorchSlimError(f"report: {str(folder)!r} holds no {REPORT_FILE} or {COMPRESS_FILE}: expected the output "
                         "directory of torchslim demo or torchslim compress")


def _from_compress_state(state: dict[str, Any]) -> dict[str, Any]:
    results = [state["input"]] if state.get("input") else []
    results += [s for s in state.get("stages", [])]
    recipe = state.get("recipe", {})
    intro = [f"Recipe `{recipe.get('name', '?')}` on `{state.get('data')}`: {state.get('description', '')}.",
             "Every row is measured on the reloaded `.slim` file written after that stage; ratio and speedup are "
             "against the input model of the same run."]
    if any(s.get("kind") == "export" for s in state.get("stages", [])):
        intro.append("Export rows measure the written `.onnx` file under ONNX Runtime (file bytes are the ONNX "
                     "file's; weight-quantized layers are exported dequantized to fp32 or re-quantized to int8).")
    return {"title": f"torchslim compress: {recipe.get('name', 'recipe')}", "intro": intro,
            "baseline": "input", "results": results, "stages": state.get("stages", [])}


def write_report(directory: str | Path, data: dict[str, Any] | None = None) -> ReportFiles:
    """Render ``report.md``, ``report.html`` and the PNG plots of a job directory.

    Args:
        directory: where the files go (and where the measurements are read from when ``data`` is None).
        data: report data to render (also saved as ``report.json`` unless the directory is a recipe run);
            None reads the saved measurements (``torchslim report DIR``).

    Returns:
        The written paths.

    Raises:
        TorchSlimError: no saved measurements in ``directory`` (when ``data`` is None).
    """
    folder = Path(directory)
    if data is None:
        data = load_report_data(folder)
    else:
        with_ratios(data.get("results", []), data.get("baseline"))
        atomic_write_text(folder / REPORT_FILE, json.dumps(data, indent=2) + "\n")
    plots = _plots(folder, data)
    markdown = atomic_write_text(folder / "report.md", _markdown(data, plots))
    page = atomic_write_text(folder / "report.html", _html(data, plots))
    files = ReportFiles(markdown=markdown, html=page, plots=[p for p, _ in plots])
    if (folder / REPORT_FILE).is_file():
        files["json"] = folder / REPORT_FILE
    return files


def _plots(folder: Path, data: dict[str, Any]) -> list[tuple[Path, str]]:
    """Write the PNGs the data supports; return ``(path, caption)`` pairs."""
    written = []
    results = [r for r in data.get("results", []) if r["measurement"].get("accuracy") is not None
               and r["measurement"].get("artifact_bytes")]
    if results:
        path = plots.plot_accuracy_vs_size([r["name"] for r in results],
                                           [r["measurement"]["artifact_bytes"] for r in results],
                                           [r["measurement"]["accuracy"] for r in results],
                                           folder / "accuracy_vs_size.png", title="accuracy vs .slim file size")
        written.append((path, "Accuracy vs file size of every artifact, with the Pareto front."))
    sweeps = data.get("sweeps", {})
    if sweeps.get("tau"):
        rows = [ThresholdRow(**row) for row in sweeps["tau"]]
        written.append((plot_threshold_sweep(rows, folder / "sparsity_vs_tau.png"),
                        "Global magnitude pruning (no fine-tuning): accuracy and sparsity vs the threshold tau."))
    if sweeps.get("bits"):
        rows = [r for r in sweeps["bits"] if r.get("bits") is not None]
        reference = next((r["accuracy"] for r in sweeps["bits"] if r.get("bits") is None), None)
        path = plots.plot_accuracy_vs_bits([r["bits"] for r in rows], [r["accuracy"] for r in rows],
                                           [r["file_bytes"] for r in rows], folder / "accuracy_vs_bits.png",
                                           reference=reference)
        written.append((path, "Integer weight quantization (per channel, no fine-tuning): accuracy and file size vs "
                              "bits per weight."))
    planner = data.get("planner")
    if planner and planner.get("points"):
        points = planner["points"]
        path = plots.plot_explored([p["file_bytes"] for p in points], [p["accuracy"] for p in points],
                                   folder / "planner_points.png", chosen=planner.get("chosen"),
                                   floor=planner.get("accuracy_floor"),
                                   title=f"planner: explored candidates ({planner.get('metric', 'accuracy')})")
        written.append((path, "Budget planner: every explored candidate (held-out accuracy vs file size), the "
                              "Pareto front and the chosen model."))
    return written


def _table_md(data: dict[str, Any]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in data.get("results", [])]
    return lines


def _markdown(data: dict[str, Any], plots: list[tuple[Path, str]]) -> str:
    lines = [f"# {data.get('title', 'torchslim report')}", ""]
    for paragraph in data.get("intro", []):
        lines += [paragraph, ""]
    lines += _table_md(data) + [""]
    planner = data.get("planner")
    if planner:
        lines += _planner_md(planner)
    for path, caption in plots:
        lines += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _planner_md(planner: dict[str, Any]) -> list[str]:
    points = planner.get("points", [])
    deployed = any("deployed_route" in p for p in points)  # target latency: each candidate's deployed route
    lines = ["## Planner", "", planner.get("summary", ""), "",
             "| # | candidate | held-out accuracy | shifted views | file bytes | MACs | "
             + ("deployed route | deployed b1 vs input | " if deployed else "") + "Pareto | meets budget |",
             "|---:|---|---:|---:|---:|---:|" + ("---|---:|" if deployed else "") + ":---:|:---:|"]
    front = set(planner.get("front", []))
    for index, p in enumerate(points):
        shifted = f"{p['shift_accuracy']:.2%}" if "shift_accuracy" in p else "-"
        route = (f"{p.get('deployed_route', '-')} | {_times(p.get('deployed_speedup_b1'))} | " if deployed else "")
        lines.append(f"| {index} | {p['label']} | {p['accuracy']:.2%} | {shifted} | {p['file_bytes']:,} | "
                     f"{p.get('macs') or '-'} | {route}{'*' if index in front else ''} | "
                     f"{'yes' if p.get('ok') else 'no'} |")
    return lines + [""]


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px}
td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}"""


def _html(data: dict[str, Any], plots: list[tuple[Path, str]]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(data.get('title', 'torchslim report'))}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(data.get('title', 'torchslim report'))}</h1>"]
    parts += [f"<p>{esc(p)}</p>" for p in data.get("intro", [])]
    parts.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr></thead><tbody>")
    for r in data.get("results", []):
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row_cells(r)) + "</tr>")
    parts.append("</tbody></table>")
    planner = data.get("planner")
    if planner:
        parts.append(f"<h2>Planner</h2><p>{esc(planner.get('summary', ''))}</p>")
        parts.append("<table><thead><tr><th>#</th><th>candidate</th><th>held-out accuracy</th><th>file bytes</th>"
                     "<th>Pareto</th><th>meets budget</th></tr></thead><tbody>")
        front = set(planner.get("front", []))
        for index, p in enumerate(planner.get("points", [])):
            parts.append(f"<tr><td>{index}</td><td>{esc(p['label'])}</td><td>{p['accuracy']:.2%}</td>"
                         f"<td>{p['file_bytes']:,}</td><td>{'*' if index in front else ''}</td>"
                         f"<td>{'yes' if p.get('ok') else 'no'}</td></tr>")
        parts.append("</tbody></table>")
    for path, caption in plots:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{encoded}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _median(m: dict[str, Any], batch: str) -> float | None:
    stats = (m.get("latency") or {}).get(batch)
    return None if not stats else stats.get("median_ms")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
