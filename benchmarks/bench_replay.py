"""How long `booth replay PATH` (show) takes on a transcript with one huge message.

Each size gets a transcript written through booth's own writer: a user message, the
assistant's answer and a tool result of that many characters (text of words, so it wraps
like prose). Then `python -m booth.cli replay PATH` runs in a subprocess and is timed, its
output thrown away.

    python benchmarks/bench_replay.py --sizes 2 5 50      # megabytes (of characters)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_transcript(path: Path, chars: int) -> None:
    from booth.agent.events import make_event, tool_answer
    from booth.agent.transcript import TranscriptWriter, make_header

    big = ("word " * (chars // 5 + 1))[:chars]
    header = make_header(model="bench", endpoint="none", sampling={}, tools=[],
                         system_prompt="s")
    writer = TranscriptWriter.create(path, header)
    writer.write(make_event("user", message={"role": "user", "content": big}))
    sent = {"role": "assistant", "content": big, "tool_calls": [
        {"id": "Sample001", "type": "function",
         "function": {"name": "sample", "arguments": '{"prompts": ["a dog"]}'}}]}
    writer.write(make_event("assistant", content=big, message=sent, tool_calls=[
        {"id": "Sample001", "name": "sample", "arguments": '{"prompts": ["a dog"]}'}]))
    writer.write(tool_answer("tool_result", "Sample001", big, tool="sample", ok=False,
                             error=big))
    writer.close()


def time_replay(path: Path, limit: float) -> float | None:
    """Seconds `booth replay PATH` took, or None when it ran past `limit`."""
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "booth.cli", "replay", str(path)], check=True,
                       stdout=subprocess.DEVNULL, timeout=limit,
                       env={**os.environ, "COLUMNS": "100"})
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2, 5],
                        help="message sizes in millions of characters")
    parser.add_argument("--limit", type=float, default=600, help="seconds before giving up")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for size in options.sizes:
            path = Path(tmp) / f"big-{size}.jsonl"
            write_transcript(path, int(size * 1_000_000))
            seconds = time_replay(path, options.limit)
            shown = f"{seconds:.1f} s" if seconds is not None else f"over {options.limit:.0f} s"
            print(f"{size:g} M characters per message ({path.stat().st_size / 1e6:.0f} MB "
                  f"file): booth replay took {shown}", flush=True)


if __name__ == "__main__":
    main()
