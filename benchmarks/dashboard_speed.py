"""Dashboard speed in a real browser (issue 5: first paint of a 10,000-character window <= 2 s;
switching the unit recolours in <= 300 ms).

Probes zoo:lstm-linux (h and c, float16) over zoo/samples/linux.c repeated to each length, serves
each Run with `rnnscope serve`, and drives headless Chromium:
  - first paint: from navigation start to the frame after the text's data source holds the window,
    by the page's own clock (performance.now());
  - unit switch: from setting the unit index in the page to the frame after the new colours arrived
    from the server (a real round trip), median of 15.
The small Run is the baseline the large one is compared with: paging keeps them equal.

    python benchmarks/dashboard_speed.py [--chars 20000,1000000]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser import served, wait_for_model  # noqa: E402
from rnnscope.dashboards.export import chromium_driver  # noqa: E402

PAINT = """const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now())));"""

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


def measure(run: Path, driver, switches: int = 15) -> tuple[float, float]:
    with served(run) as (url, _):
        driver.get("about:blank")
        driver.get(url)
        wait_for_model(driver, "text_source", timeout=60)
        paint = driver.execute_async_script(PAINT) / 1000
        times = [driver.execute_async_script(SWITCH, (i * 7 + 1) % 256) / 1000 for i in range(switches)]
    return paint, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", default="20000,1000000", help="Run lengths, comma-separated")
    args = ap.parse_args()
    base = (ROOT / "zoo/samples/linux.c").read_text()
    driver = chromium_driver()
    driver.set_script_timeout(120)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.chars.split(",")):
            text = Path(tmp) / f"t{n}.c"
            text.write_text((base * (n // len(base) + 1))[:n])
            run = Path(tmp) / f"run{n}"
            subprocess.run([sys.executable, "-m", "rnnscope.cli", "probe", "zoo:lstm-linux", "--text", str(text),
                            "--out", str(run), "--kinds", "h,c", "--chunk", "8192"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append((n, *measure(run, driver)))
    driver.quit()
    print("\ndashboard, headless Chromium, 10,000-character window, zoo:lstm-linux h and c")
    print(f"{'run length':>12s}{'first paint s':>15s}{'vs smallest':>13s}{'unit switch ms':>16s}{'vs smallest':>13s}")
    for n, paint, switch in rows:
        print(f"{n:12,d}{paint:15.2f}{paint / rows[0][1]:13.2f}{switch * 1000:16.0f}{switch / rows[0][2]:13.2f}")
    print("targets: first paint <= 2 s, unit switch <= 300 ms")


if __name__ == "__main__":
    main()
