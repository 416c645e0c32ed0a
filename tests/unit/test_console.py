"""The demo's console: one display per running stage (live line in a terminal, a few lines when piped), and Ray's
own progress output switched off for the driver and the datasets it creates."""

from __future__ import annotations

import io
import time

import pytest

from mengzi_ray.console import StageProgress, format_seconds, quiet_ray


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_stage_writes_start_heartbeats_and_result_only():
    out = io.StringIO()
    with StageProgress("pretrain", stream=out, heartbeat_s=0.2) as progress:
        time.sleep(1.6)
        progress.done("val_mlm_acc 0.410")
    lines = out.getvalue().splitlines()
    assert lines[0] == "  pretrain … started"
    assert lines[-1].startswith("  pretrain done in 0:01: val_mlm_acc 0.410")
    beats = lines[1:-1]
    assert 1 <= len(beats) <= 3 and all(b.startswith("  pretrain … running, 0:0") for b in beats)
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()  # nothing a log file cannot show
    assert 1.5 < progress.seconds < 5


def test_terminal_stage_rewrites_one_line_and_ends_with_the_result():
    out = Terminal()
    with StageProgress("extract", stream=out, refresh_s=0.05) as progress:
        time.sleep(0.3)
        progress.done("240 images")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("extract done in 0:00: 240 images\n")
    redraws = text.split("\r\033[K")
    assert len(redraws) >= 3 and all(r.startswith("  extract … 0:00") for r in redraws[1:-1])


def test_a_failing_stage_says_failed_and_raises():
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"), StageProgress("evaluate", stream=out) as progress:
        progress.done("never shown")
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1] == "  evaluate failed in 0:00"


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.9, 61, 3725)] == ["0:00", "0:59", "1:01", "62:05"]


def test_quiet_ray_turns_off_data_progress_and_worker_output(monkeypatch):
    import logging
    import os

    from ray.data import DataContext

    context = DataContext.get_current()
    for name in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start", "enable_auto_log_stats"):
        monkeypatch.setattr(context, name, True)  # restored after the test
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    handlers = [h for n in ("ray.data", "ray.serve", "ray.train") for h in logging.getLogger(n).handlers]
    levels = [h.level for h in handlers]
    try:
        init_kwargs = quiet_ray()
        assert not context.enable_progress_bars and not context.enable_operator_progress_bars
        assert not context.print_on_execution_start and not context.enable_auto_log_stats
        assert init_kwargs["log_to_driver"] is False
        assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
        consoles = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
        assert consoles and all(h.level == logging.ERROR for h in consoles if isinstance(h, logging.StreamHandler))
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)
