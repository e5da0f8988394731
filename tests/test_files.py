"""Crash residue in the metrics log: a node killed mid-append leaves a torn last line, and
the resume that follows must drop it and go on rather than refuse to start."""

import json

import pytest
from byteswarm.optim.files import MetricsLog, read_metrics


def _log(path, steps):
    log = MetricsLog(path)
    for s in steps:
        log.write({"step": s, "loss": 1.0 / s, "note": "héllo"})
    log.close()


@pytest.mark.parametrize("tail", [
    b'{"loss": 0.25, "note": "h', b'{"loss": 0.2', b"\x00" * 4096, b'{"note": "h\xc3',
    b'{"loss": 0.25,\n\x00\x00\n'])
def test_a_torn_tail_is_dropped_on_resume_and_the_log_goes_on(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    _log(path, [1, 2, 3, 4])
    with path.open("ab") as fh:  # the crash: half of step 5's line reached the disk
        fh.write(tail)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]  # readers skip it too
    log = MetricsLog(path, resume_step=3)  # the checkpoint was at step 3
    log.write({"step": 4, "loss": 0.5})
    log.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # whole lines only: the torn bytes are gone from the file
    assert [json.loads(ln)["step"] for ln in lines[:-1]] == [1, 2, 3, 4]
    assert read_metrics(path)[-1] == {"step": 4, "loss": 0.5}


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    MetricsLog(path, resume_step=9).close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_garbage_before_a_good_line_is_not_mistaken_for_a_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        MetricsLog(path, resume_step=2)
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    assert path.read_text() == '{"step": 1}\n{"st\n{"step": 2}\n'  # left for a human


def test_a_fresh_run_truncates_and_resume_without_a_file_starts_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(path, [1, 2])
    MetricsLog(path).close()
    assert read_metrics(path) == []
    MetricsLog(tmp_path / "new" / "metrics.jsonl", resume_step=5).close()
    assert read_metrics(tmp_path / "new" / "metrics.jsonl") == []
