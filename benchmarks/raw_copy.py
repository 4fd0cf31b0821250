"""The raw PostgreSQL intake baseline: parse each line with orjson, hash the body with sha256,
and COPY the rows (the columns of `raw_intake.py`) into a new table with psycopg, in one
transaction.

    python benchmarks/raw_copy.py FILE POSTGRES_URL
"""

from __future__ import annotations

import hashlib
import sys
from datetime import UTC, datetime

import orjson
import psycopg
from raw_intake import COLUMNS, REASON


def main() -> None:
    path, url = sys.argv[1], sys.argv[2]
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS raw_requests")
        conn.execute(
            "CREATE TABLE raw_requests (id BIGINT PRIMARY KEY, "
            + ", ".join(f"{c} TEXT" for c in COLUMNS[1:])
            + ")"
        )
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY raw_requests ({', '.join(COLUMNS)}) FROM STDIN") as copy,
            open(path, "rb") as f,
        ):
            for i, line in enumerate(f, 1):
                obj = orjson.loads(line)
                body = orjson.dumps(obj["body"])
                digest = hashlib.sha256(body).digest()
                copy.write_row(
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
        conn.commit()


if __name__ == "__main__":
    main()
