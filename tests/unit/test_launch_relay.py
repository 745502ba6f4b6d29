"""What `lensbench eval --num-processes N` shows of its workers' stderr (`distributed._Relay`):
a line every rank prints once, a progress bar as it is drawn, a crash as it is; torchrun's own
lines kept back."""

from __future__ import annotations

import io

import pytest

from lensbench.distributed import _Relay


def _relay(data: bytes, live: bool = True, chunk: int = 7) -> _Relay:
    """`data` read in small chunks (as a pipe may deliver it)."""

    class Chunked(io.BytesIO):
        def read1(self, n=-1):
            return super().read1(min(n, chunk))

    relay = _Relay(Chunked(data), live=live)
    relay.join()
    return relay


def test_a_line_every_rank_prints_is_shown_once(capsys):
    error = "lensbench: error: /x exists and is not a lensbench run; choose another --out or pass --overwrite"
    relay = _relay(f"{error}\n{error}\n".encode())
    assert capsys.readouterr().err == error + "\n"
    assert relay.messages == [error] and not relay.crashed


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_progress_bar_passes_as_drawn(capsys, chunk):
    stream = ("\rlensbench eval:   0%|   | 0/4\rlensbench eval:  50%|█▌ | 2/4\rlensbench eval: 100%|███| 4/4\n"
              "some warning\n\nlensbench: error: boom\nlensbench: error: boom\n")
    relay = _relay(stream.encode(), chunk=chunk)
    assert capsys.readouterr().err == stream.replace("lensbench: error: boom\n", "", 1)
    assert relay.messages == ["lensbench: error: boom"]


def test_a_worker_traceback_is_shown_and_marks_a_crash(capsys):
    trace = "[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 1\n\n[rank1]: ZeroDivisionError: x\n"
    relay = _relay(trace.encode())
    assert capsys.readouterr().err == trace
    assert relay.crashed


def test_torchrun_lines_are_kept_not_shown(capsys):
    relay = _relay(b"W1130 torch/distributed/elastic/...] Sending process 1 closing signal SIGTERM\nTraceback (most recent call last):\n",
                   live=False)
    assert capsys.readouterr().err == ""
    assert len(relay.kept) == 2 and not relay.crashed
    relay.show_kept()
    assert capsys.readouterr().err.startswith("W1130 ")


def test_quiet_shows_nothing_and_end_line_closes_a_bar(capsys):
    relay = _relay(b"\rlensbench eval:  50%|")
    relay.quiet = True
    relay._write("lensbench: interrupted\n")
    relay.end_line()
    assert capsys.readouterr().err == "\rlensbench eval:  50%|\n"
