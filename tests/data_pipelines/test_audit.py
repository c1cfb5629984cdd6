import json

from data_pipelines.audit import AuditWriter


def test_audit_appends_one_line_per_step_across_a_resume(tmp_path):
    with AuditWriter(tmp_path, rank=1) as audit:
        audit.write(1, ["coco/a", "ade/b"])
        audit.write(2, ["coco/c"])
        # Flushed per line: readable while the run is still going.
        lines = (tmp_path / "audit" / "rank_1.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
    # A resumed run appends to the same file: the repeated step 2 shows the overlap.
    with AuditWriter(tmp_path, rank=1) as audit:
        audit.write(2, ["coco/c"])
        audit.write(3, ["ade/d", "ade/e"])
    rows = [json.loads(line) for line in (tmp_path / "audit" / "rank_1.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "keys": ["coco/a", "ade/b"]},
        {"step": 2, "keys": ["coco/c"]},
        {"step": 2, "keys": ["coco/c"]},
        {"step": 3, "keys": ["ade/d", "ade/e"]},
    ]
