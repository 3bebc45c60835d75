"""Dashboard speed in a real browser (issue 23: first paint <= 1.0 s and a unit switch <= 100 ms, at
1,000,000 characters and with 10,000 documents).

Probes zoo:lstm-linux (h and c, float16) over zoo/samples/linux.c repeated to each length (and, with
--documents N, a Run of N documents of 100 characters each), serves each Run with `rnnscope serve`,
and drives headless Chromium:
  - first paint: from navigation start to the frame after the text's data source holds the window,
    by the page's own clock (performance.now()), over --repeats fresh page loads; the page's own
    navigation timing splits it: `served` is when the page's HTML arrived (the server builds the
    session's document while it answers), the rest is BokehJS loading, pulling the document over
    the websocket and drawing it;
  - unit switch: from setting the unit index in the page to the frame after the new colours arrived
    from the server (a real round trip), 15 switches per page load, once the page is idle.
Minimum and median of each; the ratios compare each Run with the smallest, measured in the same run.
--profile also times each step of building one session's document inside this process (no browser).

    python benchmarks/dashboard_speed.py [--chars 20000,1000000] [--documents 10000] [--tile 10] [--keep DIR]

--tile N adds a Run N times the longest one, its states, ids and loss that Run's repeated (a real model's
values, written in a minute; probing 10,000,000 characters would take ~45 minutes on 2 cores): the
dashboard's cost depends on the Run's length and shape, not on which values repeat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser import served, wait_for_model  # noqa: E402
from rnnscope.dashboards.export import chromium_driver  # noqa: E402

DOC_CHARS = 100          # characters per document of the --documents Run

PAINT = """const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  done([performance.now(), nav ? nav.responseEnd : NaN]);
}));"""

SWITCH = """const done = arguments[arguments.length - 1];
const doc = Bokeh.documents[0];
const src = doc.get_model_by_name('text_source'), idx = doc.get_model_by_name('unit_index');
const col = () => (src.data.get ? src.data.get('value') : src.data['value']);
const old = col();
const t0 = performance.now();
idx.value = arguments[0];
(function poll() {
  if (col() !== old) requestAnimationFrame(() => done(performance.now() - t0));
  else setTimeout(poll, 1);
})();"""

BUILT = """const done = arguments[arguments.length - 1];
(function poll() {
  const tabs = Bokeh.documents[0].get_model_by_name('views');
  if (tabs && tabs.tags.includes('built')) done(performance.now()); else setTimeout(poll, 5);
})();"""                  # the tabs built after the first paint have arrived: the page is idle from here


def measure(run: Path, driver, repeats: int, switches: int = 15) -> dict:
    paints, served_at, times = [], [], []
    with served(run) as (url, _):
        for r in range(repeats):
            driver.get("about:blank")
            driver.get(url)
            wait_for_model(driver, "text_source", timeout=60)
            paint, html = driver.execute_async_script(PAINT)
            paints.append(paint / 1000)
            served_at.append(html / 1000)
            driver.execute_async_script(BUILT)
            time.sleep(0.3)
            times += [driver.execute_async_script(SWITCH, (i * 7 + 1 + r) % 256) / 1000 for i in range(switches)]
    return {"paint": paints, "served": served_at, "switch": times}


def profile(run: Path, repeats: int = 3) -> list[tuple[str, float]]:
    """Each step of one session's document, built in this process: the best of ``repeats``."""
    from bokeh.document import Document
    from bokeh.protocol import Protocol
    from rnnscope.dashboards import app
    from rnnscope.dashboards.app import RunData

    best: dict[str, float] = {}
    t = time.perf_counter()
    data = RunData(run)
    best["open the Run and its tables (once per server)"] = time.perf_counter() - t
    for _ in range(repeats):
        doc, steps = Document(), {}
        t = time.perf_counter()
        page = app.build(doc, data, defer=True, timings=steps)
        steps = {f"first view: {k}": v for k, v in steps.items()}
        steps["first view, total"] = time.perf_counter() - t
        t = time.perf_counter()
        msg = Protocol().create("PULL-DOC-REPLY", "x", doc)
        steps["first view: serialize"] = time.perf_counter() - t
        size = len(msg.content) + sum(len(b.to_bytes()) for b in msg.buffers)
        later = page.timings.copy()
        t = time.perf_counter()
        page.tabs.open_all()
        steps["the other tabs, after the first paint"] = time.perf_counter() - t
        steps.update({f"  later: {k}": v - later.get(k, 0.0) for k, v in page.timings.items() if v - later.get(k, 0.0)})
        for k, v in steps.items():
            best[k] = min(best.get(k, v), v)
    best[f"first view's message: {size / 1e6:.2f} MB"] = float("nan")
    return list(best.items())


def make_runs(tmp: Path, chars: list[int], documents: int) -> list[tuple[str, Path]]:
    base = (ROOT / "zoo/samples/linux.c").read_text()
    inputs = []
    for n in chars:
        text = tmp / f"t{n}.c"
        if not text.exists():
            text.write_text((base * (n // len(base) + 1))[:n])
        inputs.append((f"{n:,} chars", text, tmp / f"run{n}"))
    if documents:
        text = tmp / f"docs{documents}.jsonl"
        if not text.exists():
            body = base * (documents * DOC_CHARS // len(base) + 2)
            text.write_text("".join(json.dumps({"name": f"mm/file_{i:05d}.c", "text": body[i * DOC_CHARS:(i + 1) * DOC_CHARS]})
                                    + "\n" for i in range(documents)))
        inputs.append((f"{documents:,} docs", text, tmp / f"docs{documents}"))
    for _, text, run in inputs:
        if not (run / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "rnnscope.cli", "probe", "zoo:lstm-linux", "--text", str(text),
                            "--out", str(run), "--kinds", "h,c", "--chunk", "8192", "--overwrite"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [(name, run) for name, _, run in inputs]


def tiled(run_dir: Path, factor: int, out: Path) -> Path:
    """A Run ``factor`` times ``run_dir`` (one document): its text, ids, states and per-step loss repeated,
    written through ``RunWriter`` like any Run, so ``serve`` checks it as it checks a probed one."""
    import numpy as np
    from rnnscope.store import open_run
    from rnnscope.store.writer import RunWriter
    if (out / "manifest.json").exists():
        return out
    run = open_run(run_dir)
    m, n = run.manifest, len(run)
    with RunWriter(out, run.text * factor, ids=np.tile(run.ids, factor), dtype=m["dtype"], overwrite=True) as w:
        for key in run.keys():
            rows, block = w.states(key, run[key].shape[1], m["keys"][key]["dtype"]), 1 << 16
            for k in range(factor):
                for s in range(0, n, block):
                    rows.write(k * n + s, np.asarray(run[key][s:s + block]))
        if run.loss is not None:
            loss = w.loss()
            for k in range(factor):
                loss.write(k * n, np.asarray(run.loss))
        units = run.units.copy()
        for c in ("count", "sum", "sum_sq"):
            units[c] *= factor
        w.units(units)
        keys = {k: {c: v * factor if c in ("nonfinite", "overflow", "underflow") else v for c, v in e.items()
                    if c not in ("file", "dtype")} for k, e in m["keys"].items()}
        w.commit({**{k: v for k, v in m.items() if k in ("model", "encoder", "vocab", "unk", "carry", "loss",
                                                          "modules", "kinds", "grad", "chunk", "grad_horizon",
                                                          "nonfinite")}, "keys": keys})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", default="20000,1000000", help="Run lengths, comma-separated")
    ap.add_argument("--documents", type=int, default=0, help="also a Run of this many 100-character documents")
    ap.add_argument("--repeats", type=int, default=5, help="page loads per Run")
    ap.add_argument("--tile", type=int, default=0, help="also a Run this many times the longest, its values repeated")
    ap.add_argument("--keep", type=Path, help="probe the Runs into this folder and reuse them on the next call")
    ap.add_argument("--profile", action="store_true", help="also time each build step in this process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        chars = [int(n) for n in args.chars.split(",") if n]
        runs = make_runs(tmp, chars, args.documents)
        if args.tile > 1:
            longest = max(chars)
            runs.append((f"{longest * args.tile:,} chars", tiled(tmp / f"run{longest}", args.tile,
                                                              tmp / f"run{longest}x{args.tile}")))
        driver = chromium_driver()
        driver.set_script_timeout(120)
        try:
            rows = [(name, measure(run, driver, args.repeats)) for name, run in runs]
        finally:
            driver.quit()
        profiles = [(name, profile(run)) for name, run in runs] if args.profile else []
    print("\ndashboard, headless Chromium, 10,000-step window, zoo:lstm-linux h and c "
          f"({args.repeats} page loads, 15 unit switches each)")
    print(f"{'run':>14s}{'first paint s min/median':>27s}{'(served)':>10s}{'vs first':>10s}"
          f"{'unit switch ms min/median':>28s}{'vs first':>10s}")
    first = rows[0][1]
    for name, m in rows:
        p, s = statistics.median(m["paint"]), statistics.median(m["switch"])
        print(f"{name:>14s}{min(m['paint']):15.2f} /{p:6.2f}    {statistics.median(m['served']):8.2f}"
              f"{p / statistics.median(first['paint']):10.2f}{min(m['switch']) * 1000:16.0f} /{s * 1000:6.0f}    "
              f"{s / statistics.median(first['switch']):10.2f}")
    print("targets: first paint <= 1.0 s, unit switch <= 100 ms")
    for name, steps in profiles:
        print(f"\nbuilding one session's document over the {name} Run (this process, best of 3):")
        for step, seconds in steps:
            print(f"  {step:52s}" + ("" if seconds != seconds else f"{seconds * 1000:8.1f} ms"))


if __name__ == "__main__":
    main()
