"""What a long driver (`mengzi-ray demo`) shows on its console: one live line per running stage, nothing else.

Ray's own displays are per dataset and per process: Ray Data draws a progress bar for every dataset a driver or a
training worker executes, and the bars of datasets that training workers ran (relayed to the driver) keep redrawing
after their stage is over. `quiet_ray` turns all of that off for this driver and the processes it starts, and
`StageProgress` draws the one display a stage has: in a terminal, a single line rewritten in place (stage, elapsed
time) that is replaced by the stage's result line when it ends; piped to a file, a start line, a heartbeat line every
`heartbeat_s` and the result line, so a log holds a few lines per stage. Worker output still goes to Ray's log files
(the session dir `ray.init` reports), which the demo names at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from typing import IO, Any

# Ray Data reads this in every process it starts (decode tasks, detector actors, training workers).
NO_PROGRESS_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def quiet_ray() -> dict[str, Any]:
    """Ray Data progress bars, execution banners and stats logs off in this driver, and for every dataset created
    after this call (a dataset carries a copy of the driver's DataContext, also into the training workers that
    execute it); Ray Data's console log below ERROR and Serve's and Train's INFO off (Ray Data's log file keeps everything), Ray's deprecation notices off. Returns the ray.init
    keyword arguments that keep worker and actor output out of the driver's console (it stays in the session's
    log files)."""
    os.environ.update(NO_PROGRESS_ENV)
    from ray.data import DataContext
    from ray.util.annotations import RayDeprecationWarning

    # Ray's notices about its own internals (e.g. Train's default ingest options): nothing a demo user can act on
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    for name in ("ray.data", "ray.serve", "ray.train"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:  # Ray Data's console handler; its file handler keeps everything
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        if not logger.handlers:
            logger.setLevel(logging.WARNING)
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class StageProgress:
    """The live display of one running stage (see module docstring). Use as a context manager; `done(text)` sets
    the result line printed when the stage ends. `stream` defaults to stdout; `live` defaults to whether it is a
    terminal. Usage: `with StageProgress("pretrain") as progress: ...; progress.done("val_mlm_acc 0.41")`."""

    def __init__(
        self, label: str, *, stream: IO[str] | None = None, live: bool | None = None, heartbeat_s: float = 30.0,
        refresh_s: float = 0.5,
    ) -> None:
        self.label = label
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.heartbeat_s = heartbeat_s
        self.refresh_s = refresh_s
        self.result = ""
        self.seconds = 0.0
        self._start = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def done(self, text: str) -> None:
        self.result = text

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def _draw(self) -> None:
        last_beat = 0.0
        while not self._stop.wait(self.refresh_s if self.live else 1.0):
            elapsed = self.elapsed()
            if self.live:
                self.stream.write(f"\r\033[K  {self.label} … {format_seconds(elapsed)}")
                self.stream.flush()
            elif elapsed - last_beat >= self.heartbeat_s:
                last_beat = elapsed
                self.stream.write(f"  {self.label} … running, {format_seconds(elapsed)}\n")
                self.stream.flush()

    def __enter__(self) -> "StageProgress":
        self._start = time.perf_counter()
        if not self.live:
            self.stream.write(f"  {self.label} … started\n")
            self.stream.flush()
        self._thread = threading.Thread(target=self._draw, name=f"progress:{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = self.elapsed()
        status = "failed" if exc_type is not None else "done"
        clear = "\r\033[K" if self.live else ""
        line = f"{clear}  {self.label} {status} in {format_seconds(self.seconds)}"
        self.stream.write(line + (f": {self.result}" if self.result and exc_type is None else "") + "\n")
        self.stream.flush()

