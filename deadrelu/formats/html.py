"""A self-contained HTML report: charts, a sortable and searchable site table, the gate verdict.

Charts are drawn with matplotlib and inlined as SVG. Why matplotlib rather than plotly:
the SVG is static markup, so the file opens offline, needs no script to draw its charts,
prints, and stays small (tens of kB per chart), where plotly would inline ~4 MB of
plotly.js into every report. matplotlib is mature and well maintained, and is an optional
dependency (`pip install 'deadrelu[html]'`): only this format needs it.

The only script is a few lines of vanilla JS for the table (sort on a header click,
filter as you type; state kept in the URL fragment, e.g. `report.html#q=layer2&sort=dead&dir=desc`).
When it has run, it marks `<html data-deadrelu-ready="true">` and every chart whose SVG
laid out with a non-empty box `data-rendered="true"`: the headless-browser test reads those.
"""

from __future__ import annotations

import html
import importlib.util
import io
import math
import re
from typing import Any

import numpy as np

from deadrelu.errors import UsageError
from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.gates import GateReport, pct
from deadrelu.report import ScanReport, SiteReport

MAX_SITE_CHARTS = 200  # per-site histograms beyond this are left out (the table still lists every site)
DEAD_COLOR, NEAR_COLOR, LIVE_COLOR = "#c62828", "#ef8a17", "#3b6ea8"


class HtmlFormat(ReportFormat):
    name = "html"

    def check_available(self) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--format html needs matplotlib, which is not installed: "
                             "pip install 'deadrelu[html]' (or pip install matplotlib)")

    def render(self, outcome: Outcome) -> str:
        self.check_available()
        report, gates = outcome.report, outcome.gates
        charts = _Charts()
        overview = charts.overview(report) if report.sites else "<p>No ReLU sites found.</p>"
        site_charts = [charts.site(i, s, report) for i, s in enumerate(report.sites[:MAX_SITE_CHARTS])]
        left_out = len(report.sites) - len(site_charts)
        return _PAGE.format(
            title=_e(f"deadrelu: {report.model.path}"),
            style=_STYLE,
            header=_header(report),
            verdict=_verdict(gates),
            cards=_cards(report),
            overview=overview,
            table=_table(report, gates),
            histograms="\n".join(site_charts)
            + (f'<p class="note">{left_out} more sites have no chart (at most {MAX_SITE_CHARTS}).</p>'
               if left_out > 0 else ""),
            warnings=_warnings(outcome.warnings),
            script=_SCRIPT,
        )


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _header(report: ScanReport) -> str:
    from deadrelu import __version__

    rows = [("model", f"{report.model.path} ({report.model.format})"),
            ("sha256", report.model.sha256 or "-"),
            ("data", f"{report.data.source}, {report.data.samples} samples" + (" (random)" if report.data.random else "")),
            ("thresholds", f"near-dead < {report.thresholds.near_dead:g}, dormant tau <= {report.thresholds.tau:g}"),
            ("deadrelu", __version__)]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    partial = ('<p class="partial">PARTIAL: the scan was interrupted; statistics cover '
               f'{report.data.samples} samples only.</p>' if report.partial else "")
    return f"<dl class=\"meta\">{items}</dl>{partial}"


def _verdict(gates: GateReport) -> str:
    if not gates.active:
        return '<section id="verdict" class="verdict none"><strong>No gates set</strong>: findings are reported, nothing fails.</section>'
    failures = gates.failures
    state, word = ("pass", "PASSED") if not failures else ("fail", "FAILED")
    items = "".join(f"<li>{_e(r.message)}</li>" for r in failures[:50])
    more = f"<li>… {len(failures) - 50} more</li>" if len(failures) > 50 else ""
    base = f" New findings only, against baseline {_e(gates.baseline)}." if gates.baseline else ""
    return (f'<section id="verdict" class="verdict {state}"><strong>Gates {word}</strong>: '
            f"{len(gates.all_results) - len(failures)} of {len(gates.all_results)} checks passed, "
            f"counting {_e(gates.kind_words)} units.{base}<ul>{items}{more}</ul></section>")


def _cards(report: ScanReport) -> str:
    s = report.summary()
    cards = [("sites", s["sites"], ""), ("units", s["units"], ""),
             ("dead", f"{s['dead']} ({pct(s['dead_fraction'])})", "bad" if s["dead"] else ""),
             ("near-dead", s["near_dead"], "warn" if s["near_dead"] else ""),
             ("dormant", s["dormant"], ""),
             ("collapsed sites", len(s["collapsed_sites"]), "bad" if s["collapsed_sites"] else "")]
    body = "".join(f'<div class="card {cls}"><div class="value">{_e(v)}</div><div class="label">{_e(k)}</div></div>'
                   for k, v, cls in cards)
    note = (f'<p class="note">A unit that never fired on {report.data.samples} samples fires on fewer than '
            f"{s['never_fired_bound']:.2%} of samples (95% confidence, rule of three).</p>")
    return f'<section id="summary"><div class="cards">{body}</div>{note}</section>'


_COLUMNS = (  # (key, header, type)
    ("order", "#", "num"), ("site", "site", "text"), ("op", "op", "text"), ("units", "units", "num"),
    ("dead", "dead", "num"), ("near", "near-dead", "num"), ("dormant", "dormant", "num"),
    ("active", "active rate", "num"), ("min", "pre-act min", "num"), ("max", "pre-act max", "num"),
    ("mean", "pre-act mean", "num"), ("gate", "gate", "text"),
)


def _table(report: ScanReport, gates: GateReport) -> str:
    head = "".join(f'<th data-key="{k}" data-type="{t}" aria-sort="none"><button type="button">{_e(h)}</button></th>'
                   for k, h, t in _COLUMNS)
    ignored = {s.name for s in gates.sites if s.ignored}
    rows = []
    for i, site in enumerate(report.sites):
        m = site.preact
        results = gates.site_results(site.name)
        failed = [r for r in results if not r.passed]
        gate = "ignored" if site.name in ignored else ("-" if not results else ("FAIL" if failed else "pass"))
        classes = " ".join(c for c in ("collapsed" if site.verdict.collapsed else "",
                                       "fail" if failed else "", "dead" if site.dead else "") if c)
        search = " ".join((site.name, site.op, gate.lower(), "collapsed" if site.verdict.collapsed else "")).lower()
        title = _e("; ".join(r.message for r in failed)) if failed else ""
        cells = [
            (i, str(i + 1)),
            (None, f'<a href="#site-{i}">{_e(site.name)}</a>'),
            (None, _e(site.op)),
            (site.units, str(site.units)),
            (site.dead, str(site.dead)),
            (len(site.verdict.near_dead), str(len(site.verdict.near_dead))),
            (len(site.verdict.dormant), str(len(site.verdict.dormant))),
            (site.active_rate, f"{site.active_rate:.1%}"),
            (m.min, _num(m.min)), (m.max, _num(m.max)), (m.mean, _num(m.mean)),
            (None, f'<span title="{title}">{_e(gate)}</span>'),
        ]
        tds = "".join(f'<td data-value="{_value(v)}">{text}</td>' if v is not None else f"<td>{text}</td>"
                      for v, text in cells)
        rows.append(f'<tr class="{classes}" data-search="{_e(search)}">{tds}</tr>')
    return (f'<div class="table-tools"><input type="search" id="site-filter" placeholder="Filter sites by name…" '
            f'aria-label="Filter sites"> <span id="site-count">{len(report.sites)} sites</span></div>'
            f'<table id="site-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _value(v: float | int) -> str:
    v = float(v)
    return repr(v) if math.isfinite(v) else ("" if math.isnan(v) else ("1e308" if v > 0 else "-1e308"))


def _num(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3g}"


def _warnings(warnings: tuple[str, ...]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<section id="warnings"><h2>Warnings</h2><ul>{items}</ul></section>'


class _Charts:
    """matplotlib figures -> inline SVG (text kept as text, ids made unique per chart)."""

    def __init__(self) -> None:
        import matplotlib

        self._mpl = matplotlib
        self._count = 0

    def _svg(self, fig: Any, tight: bool = False) -> str:
        self._count += 1
        prefix = f"c{self._count}-"
        buf = io.StringIO()
        with self._mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix}):
            fig.savefig(buf, format="svg", bbox_inches="tight" if tight else None, metadata={"Date": None})
        svg = buf.getvalue()
        svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE
        svg = re.sub(r'id="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
        svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', svg)
        return svg

    def _figure(self, width: float, height: float) -> Any:
        from matplotlib.figure import Figure

        with self._mpl.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False}):
            return Figure(figsize=(width, height))

    def overview(self, report: ScanReport) -> str:
        sites = report.sites
        names = [s.name for s in sites]
        dead = np.array([s.dead / s.units if s.units else 0.0 for s in sites])
        near = np.array([len(s.verdict.near_dead) / s.units if s.units else 0.0 for s in sites])
        fig = self._figure(8.5, max(2.2, 0.24 * len(sites) + 1.0))
        with self._mpl.rc_context({"font.size": 9}):
            ax = fig.add_subplot()
            y = np.arange(len(sites))
            ax.barh(y, dead, color=DEAD_COLOR, label="dead")
            ax.barh(y, near, left=dead, color=NEAR_COLOR, label="near-dead")
            ax.set_yticks(y, labels=names)
            ax.invert_yaxis()  # execution order, top to bottom
            top = float((dead + near).max()) if len(sites) else 0.0
            ax.set_xlim(0, max(0.05, min(1.0, top * 1.15)))
            ax.xaxis.set_major_formatter(self._mpl.ticker.PercentFormatter(1.0))
            ax.set_xlabel("fraction of the site's units")
            ax.grid(axis="x", alpha=0.3)
            ax.legend(loc="lower right", frameon=False)
            for i, s in enumerate(sites):
                if s.verdict.collapsed:
                    ax.annotate("collapsed", (dead[i] + near[i], i), xytext=(4, 0), textcoords="offset points",
                                va="center", color=DEAD_COLOR, fontsize=8)
        return f'<figure class="chart" data-chart="overview">{self._svg(fig, tight=True)}</figure>'

    def site(self, index: int, site: SiteReport, report: ScanReport) -> str:
        st = site.stats
        fig = self._figure(7.0, 2.1)
        with self._mpl.rc_context({"font.size": 8}):
            rate_ax, max_ax = fig.subplots(1, 2)
            rates = np.asarray(st.active_rate, dtype=np.float64)
            dead_mask = (st.positive == 0) & (st.observed > 0)
            bins = np.linspace(0.0, 1.0, 21)
            rate_ax.hist([rates[dead_mask], rates[~dead_mask]], bins=bins, stacked=True,
                         color=[DEAD_COLOR, LIVE_COLOR], label=["dead", "alive"])
            rate_ax.axvline(report.thresholds.near_dead, color=NEAR_COLOR, linestyle="--", linewidth=1)
            rate_ax.set_xlabel("unit active rate")
            rate_ax.set_ylabel("units")
            rate_ax.set_xlim(0, 1)
            maxima = np.asarray(st.maximum, dtype=np.float64)
            finite = np.isfinite(maxima)
            values = maxima[finite]
            if values.size:
                # A dead unit at -1000 among live ones near 1 would squash a linear axis: then
                # bin asinh(max) (linear near 0, logarithmic beyond) and label the ticks in max.
                squash = _wide(values)
                shown = np.arcsinh(values) if squash else values
                lo, hi = float(shown.min()), float(shown.max())
                edges = np.linspace(lo - 0.5, hi + 0.5, 25) if hi == lo else np.linspace(lo, hi, 25)
                max_ax.hist([shown[dead_mask[finite]], shown[~dead_mask[finite]]], bins=edges, stacked=True,
                            color=[DEAD_COLOR, LIVE_COLOR], label=["dead", "alive"])
                max_ax.axvline(0.0, color="#555555", linestyle=":", linewidth=1)
                if squash:
                    ticks = _asinh_ticks(lo - 0.4, hi + 0.4)
                    at = np.arcsinh(ticks)
                    max_ax.set_xticks(at, labels=[f"{t:g}" for t in ticks])
                    max_ax.set_xlim(min(lo, float(at.min())) - 0.1, max(hi, float(at.max())) + 0.1)
            max_ax.set_xlabel("unit pre-activation max" + (" (asinh scale)" if values.size and squash else ""))
            fig.legend(*rate_ax.get_legend_handles_labels(), loc="upper right", ncol=2, frameon=False, fontsize=7)
            fig.suptitle(f"{site.name}  ({site.units} units, {site.dead} dead)", fontsize=9, x=0.01, ha="left")
            fig.subplots_adjust(left=0.08, right=0.98, bottom=0.22, top=0.84, wspace=0.22)
        return (f'<figure class="chart site-chart" id="site-{index}" data-chart="site" data-site="{_e(site.name)}">'
                f"{self._svg(fig)}<figcaption>{_e(site.name)}</figcaption></figure>")


def _asinh_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """0 and signed powers of ten within [sinh(lo), sinh(hi)], thinned to at most `most`."""
    a, b = float(np.sinh(lo)), float(np.sinh(hi))
    ticks = [0.0] if a <= 0 <= b else []
    for k in range(0, 13):
        for t in (10.0 ** k, -(10.0 ** k)):
            if a <= t <= b:
                ticks.append(t)
    ticks.sort()
    while len(ticks) > most:
        ticks = [t for i, t in enumerate(ticks) if i % 2 == 0 or t == 0.0]
    return ticks


def _wide(values: np.ndarray) -> bool:
    """A few outliers (a dead unit at -1000 among live ones near 1) would squash a linear axis."""
    q1, q3 = np.percentile(values, [25, 75])
    spread = max(float(q3 - q1), 1e-3 * max(float(np.abs(values).max()), 1e-12))
    return float(values.max() - values.min()) > 25 * spread


_STYLE = """
:root { --bad: #c62828; --warn: #b45f06; --ok: #2e7d32; --line: #d9dde3; --muted: #5f6b7a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2530; margin: 0 auto;
       max-width: 1200px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 17px; margin: 28px 0 10px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0 0 16px; color: var(--muted); }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.verdict { border-radius: 6px; padding: 10px 14px; margin: 12px 0; border: 1px solid var(--line); }
.verdict.pass { background: #e8f5e9; border-color: #a5d6a7; } .verdict.fail { background: #fdecea; border-color: #f5b7b1; }
.verdict ul { margin: 6px 0 0; padding-left: 20px; } .partial { color: var(--bad); font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.card .value { font-size: 20px; font-weight: 600; } .card .label { color: var(--muted); font-size: 12px; }
.card.bad .value { color: var(--bad); } .card.warn .value { color: var(--warn); }
.note { color: var(--muted); font-size: 12px; }
figure.chart { margin: 0; } figure.chart svg { max-width: 100%; height: auto; }
.site-charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
.site-chart { border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
.site-chart figcaption { display: none; }
.table-tools { margin: 6px 0; } #site-filter { padding: 5px 8px; width: 280px; border: 1px solid #b8c0cc; border-radius: 4px; }
#site-count { color: var(--muted); margin-left: 8px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: right; }
th:nth-child(2), td:nth-child(2), th:nth-child(3), td:nth-child(3) { text-align: left; }
td:nth-child(2) { overflow-wrap: anywhere; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; } th[aria-sort="descending"] button::after { content: " \\25BC"; }
tr.dead td:nth-child(5) { color: var(--bad); font-weight: 600; }
tr.fail td:last-child, tr.collapsed td:nth-child(2) { color: var(--bad); font-weight: 600; }
tbody tr:hover { background: #f5f7fa; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("site-table");
  var filter = document.getElementById("site-filter");
  var count = document.getElementById("site-count");
  if (table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var state = { q: "", sort: "", dir: "asc" };
    var read = function (row, index, type) {
      var cell = row.cells[index];
      var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
      if (type !== "num") { return raw.toLowerCase(); }
      var value = parseFloat(raw);
      return isNaN(value) ? -Infinity : value;
    };
    var apply = function () {
      var index = -1;
      heads.forEach(function (th, i) {
        var on = th.getAttribute("data-key") === state.sort;
        if (on) { index = i; }
        th.setAttribute("aria-sort", on ? (state.dir === "desc" ? "descending" : "ascending") : "none");
      });
      if (index >= 0) {
        var type = heads[index].getAttribute("data-type");
        var sign = state.dir === "desc" ? -1 : 1;
        rows.sort(function (a, b) {
          var x = read(a, index, type), y = read(b, index, type);
          return (x < y ? -1 : x > y ? 1 : 0) * sign || (read(a, 0, "num") - read(b, 0, "num"));
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      var terms = state.q.trim().toLowerCase().split(/\\s+/).filter(Boolean);
      var shown = 0;
      rows.forEach(function (row) {
        var text = row.getAttribute("data-search");
        var hit = terms.every(function (t) { return text.indexOf(t) >= 0; });
        row.hidden = !hit;
        if (hit) { shown += 1; }
      });
      count.textContent = shown + " of " + rows.length + " sites";
    };
    var save = function () {
      var parts = [];
      if (state.q) { parts.push("q=" + encodeURIComponent(state.q)); }
      if (state.sort) { parts.push("sort=" + state.sort, "dir=" + state.dir); }
      if (window.history && history.replaceState) { history.replaceState(null, "", parts.length ? "#" + parts.join("&") : "#"); }
    };
    location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
      var kv = pair.split("=");
      if (kv[0] in state && kv.length === 2) { state[kv[0]] = decodeURIComponent(kv[1]); }
    });
    filter.value = state.q;
    heads.forEach(function (th) {
      th.querySelector("button").addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        state.dir = state.sort === key && state.dir === "asc" ? "desc" : "asc";
        state.sort = key;
        apply(); save();
      });
    });
    filter.addEventListener("input", function () { state.q = filter.value; apply(); save(); });
    apply();
    table.setAttribute("data-ready", "true");
  }
  Array.prototype.forEach.call(document.querySelectorAll("figure.chart > svg"), function (svg) {
    var box = svg.getBoundingClientRect();
    if (box.width > 0 && box.height > 0 && svg.querySelector("path, rect, use")) {
      svg.parentNode.setAttribute("data-rendered", "true");
    }
  });
  document.documentElement.setAttribute("data-deadrelu-ready", "true");
})();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="deadrelu">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>deadrelu report</h1>
{header}
{verdict}
{cards}
<section id="overview"><h2>Dead and near-dead units per site</h2>
{overview}
</section>
<section id="sites"><h2>Sites</h2>
{table}
</section>
<section id="histograms"><h2>Per-site distributions: unit active rate and pre-activation max</h2>
<p class="note">Red: dead units. The dashed line is the near-dead threshold; the dotted one is 0 (a unit whose
maximum is at or below it never fired).</p>
<div class="site-charts">
{histograms}
</div>
</section>
{warnings}
<script>{script}</script>
</body>
</html>
"""
