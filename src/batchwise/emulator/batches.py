"""What both providers' batches share: settling each line's fate when the batch is created.

A line's outcome (success with its usage, a validation error, an injected fault) is decided
once, in the batch's shuffled processing order, so the prompt cache sees lines in the order
they "run"; results are rendered from the input again whenever they are downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from batchwise.emulator.env import Env
from batchwise.emulator.http import ApiError, anthropic_error_type
from batchwise.emulator.prompts import NO_CACHE_USE, PrefixCache, Prompt
from batchwise.emulator.seeded import rng
from batchwise.emulator.state import LineRow

#: bytes per chunk when streaming a result file: the server hands each chunk of a streamed
#: answer to a worker thread, so small chunks cost more in handoffs than in rendering
RESULT_CHUNK_BYTES = 1 << 20


@dataclass
class LineDraft:
    """One request of a new batch, checked but not yet settled."""

    line_no: int
    custom_id: str
    #: where the request's JSON sits in the batch's input blob
    offset: int
    length: int
    #: the error this line will answer with (invalid params), if any
    error: ApiError | None = None
    #: the prompt, for the cache to read and fill (None: nothing it would cache)
    prompt: Prompt | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


def processing_order(seed: int, batch_id: str, count: int) -> list[int]:
    """The order lines run (and appear in results): a seeded shuffle of the input order."""
    order = list(range(count))
    rng(seed, "order", batch_id).shuffle(order)
    return order


def settle_lines(
    env: Env,
    cache: PrefixCache,
    batch_id: str,
    drafts: Sequence[LineDraft],
    *,
    provider: str,
    now: float,
) -> list[LineRow]:
    """Each line's outcome, in processing order; successful lines read and fill the cache."""
    rows: list[LineRow] = []
    faults = 0
    for pos, idx in enumerate(processing_order(env.config.seed, batch_id, len(drafts))):
        d = drafts[idx]
        error = d.error
        if error is None:
            error = env.faults.line(batch_id, d.custom_id)
            faults += error is not None
        if error is not None:
            err_type = (
                anthropic_error_type(error.status) if provider == "anthropic" else error.openai_type
            )
            rows.append(
                LineRow(
                    pos,
                    d.line_no,
                    d.custom_id,
                    d.offset,
                    d.length,
                    error.status,
                    err_type,
                    error.code,
                    error.message,
                    error.param,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                )
            )
            continue
        use = cache.use(d.prompt, now) if d.prompt is not None else NO_CACHE_USE
        rows.append(
            LineRow(
                pos,
                d.line_no,
                d.custom_id,
                d.offset,
                d.length,
                200,
                None,
                None,
                None,
                None,
                d.input_tokens,
                use.read,
                use.write_5m,
                use.write_1h,
                d.output_tokens,
                d.reasoning_tokens,
            )
        )
    if faults:
        env.state.bump("fault.line_error", faults)
    return rows


def chunked(lines: Iterator[bytes]) -> Iterator[bytes]:
    """Group result lines into chunks of about `RESULT_CHUNK_BYTES`."""
    buf: list[bytes] = []
    size = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= RESULT_CHUNK_BYTES:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


#: `os.pread(fd, length, offset)` where the OS has it
_pread: Callable[[int, int, int], bytes] | None = getattr(os, "pread", None)


def read_at(handle: BinaryIO, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of an open binary file.

    Result files read their lines in processing order, a shuffle of the file's: one `pread`
    reads just the line, where a seek and a buffered read fill a whole buffer for each.
    """
    if _pread is None:  # no pread on this OS
        handle.seek(offset)
        return handle.read(length)
    return _pread(handle.fileno(), length, offset)
