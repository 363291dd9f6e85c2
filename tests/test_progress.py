"""Progress on a terminal, in a log file, and quiet."""

import io
import time

from slotsmith.progress import Progress, display_mode, format_seconds, phase


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_display_mode_follows_quiet_and_the_terminal():
    assert display_mode(False, _Tty()) == "off"
    assert display_mode(True, _Tty()) == "bar"
    assert display_mode(True, io.StringIO()) == "lines"


def test_off_a_terminal_lines_come_at_start_every_interval_and_at_the_end():
    out = io.StringIO()
    with Progress("train", 10, unit="it", stream=out, interval=0.05) as p:
        p.update(3, loss="0.1234", lr="2.00e-05")
        time.sleep(0.3)  # several intervals with no update: the log still hears from the run
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 0/10 it (0%)")
    assert len(lines) >= 4
    last = lines[-1]
    assert last.startswith("train: 3/10 it (30%) loss 0.1234 lr 2.00e-05 ")
    assert " it/s " in last and " ETA " in last


def test_resumed_counts_rate_only_this_runs_work_and_bytes_show_mb():
    out = io.StringIO()
    with Progress("splice", 4_000_000, unit="B", stream=out, interval=60) as p:
        time.sleep(0.05)
        p.update(2_000_000)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("splice: 2.0 MB/4.0 MB (50%) ") and " MB/s " in last
    p = Progress("train", 100, initial=50, stream=io.StringIO(), interval=60)
    assert "it/s" not in p.line()  # nothing done in this run yet: no rate to claim
    p.close()


def test_quiet_prints_nothing():
    out = _Tty()
    with Progress("train", 10, show=False, stream=out) as p:
        p.update(5)
    with phase("loading the base", show=False, stream=out, delay=0):
        time.sleep(0.05)
    assert out.getvalue() == ""


def test_a_phase_speaks_only_when_it_lasts():
    out = io.StringIO()
    with phase("hashing", stream=out, delay=10):
        pass
    assert out.getvalue() == ""
    with phase("loading the base", stream=out, delay=0.01, interval=0.05):
        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "loading the base..."
    assert lines[1].startswith("loading the base... (")
    assert lines[-1].startswith("loading the base: done in ")


def test_format_seconds():
    assert [format_seconds(s) for s in (4.4, 65, 7260)] == ["4s", "1m05s", "2h01m"]
