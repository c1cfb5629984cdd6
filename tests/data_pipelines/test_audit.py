import json
import logging

from data_pipelines.streaming.audit import AuditWriter, cut_audit_trails


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_audit_appends_one_line_per_step(tmp_path):
    with AuditWriter(tmp_path, rank=1) as audit:
        audit.write(1, ["coco/a", "ade/b"])
        audit.write(2, ["coco/c"])
        # Flushed per line: readable while the run is still going.
        assert _steps(tmp_path / "audit" / "rank_1.jsonl") == [1, 2]
    rows = [json.loads(line) for line in (tmp_path / "audit" / "rank_1.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "keys": ["coco/a", "ade/b"]}, {"step": 2, "keys": ["coco/c"]}]


def test_a_resume_cuts_the_discarded_steps_from_every_trail(tmp_path, caplog):
    """Issue 15 item 14: a run killed at step 5 with its checkpoint at step 3 trained steps 4
    and 5 for nothing; the resumed run cuts them (on every rank's trail, also rank 2's of a
    bigger earlier world, and a line torn by the kill), so each step appears once, as trained."""
    for rank in (0, 1, 2):
        with AuditWriter(tmp_path, rank=rank) as audit:
            for step in range(1, 6):
                audit.write(step, [f"src/{rank}-{step}"])
    with open(tmp_path / "audit" / "rank_1.jsonl", "a") as f:
        f.write('{"step": 6, "ke')  # torn by SIGKILL
    caplog.set_level(logging.WARNING, logger="data_pipelines.streaming.audit")
    assert cut_audit_trails(tmp_path, after_step=3) == 2 + 3 + 2
    assert "rank_1.jsonl: dropped 3 line(s) (steps 4..5, 1 torn) past step 3" in caplog.text, caplog.text
    for rank in (0, 1):  # the resumed run (2 ranks) appends from step 4
        with AuditWriter(tmp_path, rank=rank) as audit:
            audit.write(4, [f"src/{rank}-again"])
    assert _steps(tmp_path / "audit" / "rank_0.jsonl") == [1, 2, 3, 4]
    assert _steps(tmp_path / "audit" / "rank_1.jsonl") == [1, 2, 3, 4]
    assert _steps(tmp_path / "audit" / "rank_2.jsonl") == [1, 2, 3]
    last = json.loads((tmp_path / "audit" / "rank_0.jsonl").read_text().splitlines()[-1])
    assert last == {"step": 4, "keys": ["src/0-again"]}
    # Nothing past the resume point: nothing cut, nothing logged; a fresh run cuts it all.
    assert cut_audit_trails(tmp_path, after_step=4) == 0
    assert cut_audit_trails(tmp_path, after_step=0) == 4 + 4 + 3
    assert (tmp_path / "audit" / "rank_0.jsonl").read_text() == ""
    assert cut_audit_trails(tmp_path / "no_run_yet", after_step=0) == 0
