"""Shared bits of the benchmarks: the wt2-512 protocol, a peak-RSS sampler, table output."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2-raw"
RESULTS = ROOT / "bench" / "results"


def wt2_sources() -> tuple[str, str]:
    """(calibration file, evaluation file) of protocol wt2-512; exits with advice when absent."""
    calib, evaluation = SHARED / "calib-20.txt", SHARED / "eval-80.txt"
    if not calib.exists():
        raise SystemExit(f"Protocol wt2-512 needs {calib} (the project's ../shared/data); it is not here. "
                         "Pass --calib-text/--eval-text to use other files (and say so beside the numbers).")
    return str(calib), str(evaluation)


def add_protocol_args(ap) -> None:
    """The model and the wt2-512 sizes every protocol benchmark takes (smaller = a labelled variant)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)


def protocol_label(args) -> str:
    """'wt2-512' at the protocol's sizes, else a name that says what differs."""
    if (args.calib_windows, args.eval_windows, args.seqlen) == (64, 64, 512):
        return "wt2-512"
    return f"wt2-{args.seqlen} with {args.calib_windows} calibration / {args.eval_windows} eval windows"


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples the process's resident memory every 20 ms while in the with-block."""

    def __enter__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def gib(self) -> float:
        return self.peak / 2**30


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format). Returns the markdown table it printed."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def save(name: str, payload: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return path
