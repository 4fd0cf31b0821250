"""Emulator benchmark: how fast it starts and stops, and how fast its HTTP layer moves bytes.

    python benchmarks/bench_emulator.py [--lines 50000] [--upload-mb 150] [--starts 50]

1. start + stop of an in-process emulator, `--starts` times (tests start many of them); then
   one stop with an idle keep-alive connection and a dripping answer open;
2. a batch of `--lines` chat lines (~550 bytes, as batchwise sends them) against
   `batchwise emulator` (turnaround 0) in its own process: upload, create (the emulator checks
   and plans every line), download of the results (rendered line by line), each step's wall
   time and emulator CPU;
3. a raw multipart upload of `--upload-mb` MB, with the emulator process's peak RSS (an
   upload must stream to disk, not sit in memory).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import openai_line  # noqa: E402
from bench_lifecycle import proc_cpu_s, proc_peak_mb, start_emulator  # noqa: E402

from batchwise.emulator.app import Emulator, EmulatorConfig  # noqa: E402

CHAT = "/v1/chat/completions"


def start_stop(n: int) -> None:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        with Emulator(EmulatorConfig()) as emu:
            up = time.perf_counter()
            httpx.get(f"{emu.url}/_emulator/health").raise_for_status()
            answered = time.perf_counter()
        times.append((up - started, answered - up, time.perf_counter() - answered))
    for i, name in enumerate(("start (to URL)", "first answer", "stop")):
        values = sorted(t[i] * 1000 for t in times)
        print(f"  {name:15} median {statistics.median(values):6.1f} ms  max {values[-1]:6.1f} ms")


def stop_with_open_connections() -> None:
    emu = Emulator(EmulatorConfig(slow_response_rate=1.0))
    emu.start()
    idle = httpx.Client()
    idle.get(f"{emu.url}/_emulator/health")  # a keep-alive connection, left open

    def drip() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{emu.openai_base_url}/batches", headers={"authorization": "Bearer k"})

    dripping = threading.Thread(target=drip)
    dripping.start()
    time.sleep(1.5)
    started = time.perf_counter()
    emu.close()
    print(
        f"  stop with a keep-alive and a dripping answer open: "
        f"{(time.perf_counter() - started) * 1000:.0f} ms"
    )
    dripping.join()
    idle.close()


def batch_round_trip(workdir: Path, lines: int) -> None:
    """A batch of `lines` chat requests like `_common.openai_line`'s (the batchwise-only
    `tolerance` dropped): the emulator's CPU seconds for each step, read from /proc."""
    proc, url = start_emulator(workdir)
    try:
        client = httpx.Client(
            base_url=url + "/v1", headers={"authorization": "Bearer k"}, timeout=600
        )
        path = workdir / "in.jsonl"
        rnd = random.Random(7)
        with path.open("wb") as out:
            for i in range(lines):
                obj = orjson.loads(openai_line(i, rnd))
                del obj["tolerance"]
                out.write(orjson.dumps(obj) + b"\n")
        steps: list[tuple[str, float, float]] = []
        cpu, wall = proc_cpu_s(proc.pid), time.perf_counter()

        def step(name: str) -> None:
            nonlocal cpu, wall
            now_cpu, now_wall = proc_cpu_s(proc.pid), time.perf_counter()
            steps.append((name, now_wall - wall, now_cpu - cpu))
            cpu, wall = now_cpu, now_wall

        with path.open("rb") as fh:
            up = client.post("/files", files={"file": ("in.jsonl", fh)}, data={"purpose": "batch"})
        up.raise_for_status()
        step("upload")
        created = client.post(
            "/batches",
            json={"input_file_id": up.json()["id"], "endpoint": CHAT, "completion_window": "24h"},
        )
        created.raise_for_status()
        step("create")
        batch = created.json()
        while batch["status"] != "completed":
            batch = client.get(f"/batches/{batch['id']}").json()
        step("to completed")
        got = 0
        with client.stream("GET", f"/files/{batch['output_file_id']}/content") as down:
            for chunk in down.iter_bytes():
                got += chunk.count(b"\n")
        step("download")
        assert got == lines, got
        mb = path.stat().st_size / 1e6
        peak = proc_peak_mb(proc.pid)
        print(f"  {lines} lines ({mb:.1f} MB), emulator process, peak RSS {peak:.0f} MB:")
        for name, seconds, cpu_s in steps:
            print(f"    {name:13} {seconds:5.2f} s, emulator CPU {cpu_s:5.2f} s")
        client.close()
    finally:
        proc.terminate()
        proc.wait()


def raw_upload(workdir: Path, megabytes: int) -> None:
    proc, url = start_emulator(workdir)
    try:
        line = b'{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{}}\n'
        total = megabytes * 1_000_000 // len(line)

        def body() -> Iterator[bytes]:
            chunk = line * 1000
            for _ in range(total // 1000):
                yield chunk

        boundary = "bench-boundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"'
            "\r\nContent-Type: application/jsonl\r\n\r\n"
        ).encode()

        def multipart() -> Iterator[bytes]:
            yield head
            yield from body()
            yield f"\r\n--{boundary}--\r\n".encode()

        rss0 = proc_peak_mb(proc.pid)
        cpu0 = proc_cpu_s(proc.pid)
        started = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/files",
            content=multipart(),
            headers={
                "authorization": "Bearer k",
                "content-type": f"multipart/form-data; boundary={boundary}",
            },
            timeout=600,
        )
        took = time.perf_counter() - started
        r.raise_for_status()
        size = r.json()["bytes"]
        cpu1 = proc_cpu_s(proc.pid)
        print(
            f"  upload {size / 1e6:.0f} MB chunked: {took:.2f} s ({size / 1e6 / took:.0f} MB/s), "
            f"emulator CPU {cpu1 - cpu0:.2f} s; emulator peak RSS {rss0:.0f} MB before, "
            f"{proc_peak_mb(proc.pid):.0f} MB after"
        )
        started = time.perf_counter()
        with httpx.stream(
            "GET",
            f"{url}/v1/files/{r.json()['id']}/content",
            headers={"authorization": "Bearer k"},
            timeout=600,
        ) as down:
            got = sum(len(c) for c in down.iter_raw())
        took = time.perf_counter() - started
        assert got == size, (got, size)
        print(
            f"  download {got / 1e6:.0f} MB: {took:.2f} s ({got / 1e6 / took:.0f} MB/s), "
            f"emulator CPU {proc_cpu_s(proc.pid) - cpu1:.2f} s"
        )
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--upload-mb", type=int, default=150)
    parser.add_argument("--starts", type=int, default=50)
    args = parser.parse_args()
    if args.starts:
        print(f"start + stop, {args.starts} emulators:")
        start_stop(args.starts)
        stop_with_open_connections()
    if args.lines:
        with tempfile.TemporaryDirectory() as tmp:
            print("batch round trip (chat, emulator process):")
            batch_round_trip(Path(tmp) / "a", args.lines)
    if args.upload_mb:
        with tempfile.TemporaryDirectory() as tmp:
            print("raw multipart upload and download:")
            raw_upload(Path(tmp), args.upload_mb)


if __name__ == "__main__":
    main()
