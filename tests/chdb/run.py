"""Runs SQL steps in chDB (the chdb-core package: ClickHouse 26.x in-process), for
tests/analytics_chdb.rs.

    python run.py JOB.json RESULT.json

JOB.json: {"steps": [{"name": str, "sql": str}, ...]}, run in order in one session (so `USE db`
and `SET` carry over) with a fresh data directory. RESULT.json: {"version": str, "steps":
[{"name", "ok", "tsv", "error"}, ...]}: each step's TabSeparated output or its error. Decimals
are printed with all their places (output_format_decimal_trailing_zeros = 1), as ClickHouse
18.16 prints them, so the outputs compare as text.
"""

import json
import sys
import tempfile

from chdb.session import Session


def main() -> int:
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    out = []
    with tempfile.TemporaryDirectory(prefix="tally-chdb-") as data:
        session = Session(data)
        session.query("SET output_format_decimal_trailing_zeros = 1")
        version = str(session.query("SELECT version()", "TSV")).strip()
        for step in job["steps"]:
            try:
                res = session.query(step["sql"], "TSV")
                out.append({"name": step["name"], "ok": True, "tsv": str(res), "error": None})
            except Exception as e:  # the error text goes back to the Rust test
                out.append({"name": step["name"], "ok": False, "tsv": "", "error": str(e)})
        session.close()
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"version": version, "steps": out}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
