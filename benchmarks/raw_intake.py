"""The raw intake baseline: parse each line with orjson, hash the body with sha256, and insert
with sqlite3.executemany into a table with the same columns as batchwise's `requests`."""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from datetime import UTC, datetime

import orjson

COLUMNS = (
    "id",
    "custom_id",
    "provider",
    "endpoint",
    "model",
    "body",
    "body_hash",
    "body_key",
    "tolerance",
    "deadline",
    "lane",
    "reason",
    "state",
    "attempts",
    "use_case",
    "step",
    "business_unit",
    "task_id",
    "tags",
    "size_bytes",
    "est_input_tokens",
    "input_format",
    "created_at",
    "updated_at",
    "job_run_id",
    "submission_id",
    "loop_key",
)
#: a classifier reason of the length batchwise stores, so both write the same volume
REASON = (
    "deadline in 1d leaves room for flush wait 10m + turnaround 2h (prior for openai) "
    "+ rescue margin 15m = 2h25m"
)


def main() -> None:
    path, db = sys.argv[1], sys.argv[2]
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
        + ", ".join(f"{c} TEXT" for c in COLUMNS[1:])
        + ")"
    )
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    sql = f"INSERT INTO requests VALUES ({', '.join('?' for _ in COLUMNS)})"
    rows = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            obj = orjson.loads(line)
            body = orjson.dumps(obj["body"])
            digest = hashlib.sha256(body).digest()
            rows.append(
                (
                    i,
                    obj["custom_id"],
                    "openai",
                    obj["url"],
                    obj["body"]["model"],
                    body.decode(),
                    digest.hex(),
                    int.from_bytes(digest[:8], "big", signed=True),
                    obj.get("tolerance"),
                    now,
                    "deferred",
                    REASON,
                    "queued",
                    0,
                    None,
                    None,
                    None,
                    None,
                    "{}",
                    len(body),
                    len(body) // 4,
                    "openai",
                    now,
                    now,
                    None,
                    1,
                    None,
                )
            )
            if len(rows) == 2000:
                conn.executemany(sql, rows)
                rows.clear()
    conn.executemany(sql, rows)
    conn.commit()


if __name__ == "__main__":
    main()
