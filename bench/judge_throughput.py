"""Judge throughput against a local OpenAI-compatible server with a fixed latency per call (not a timed test).

    PYTHONPATH=. python bench/judge_throughput.py --responses 500 --latency 0.2 --concurrency 32

Runs the real judge stage (judge_samples: AsyncOpenAI over HTTP, journal, sqlite cache, progress bar) on a
synthetic samples file with 2 metrics per response, against tests/openai_server.py on 127.0.0.1, then reruns it
to show that the cache answers everything without a call. Prints judgments/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from judge_fixtures import write_questions, write_samples  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

from persona_em.judging.run import judge_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=500)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the server waits before each answer")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("BENCH_JUDGE_KEY", "bench-key")
    with tempfile.TemporaryDirectory() as d, OpenAIServer(latency=args.latency) as server:
        tmp = Path(d)
        q = write_questions(tmp)
        s = write_samples(tmp / "samples.jsonl", [f"Answer number {i}: I would like peace." for i in range(args.responses)])
        cfg = {"backend": "openai", "model": "bench-judge", "base_url": server.base_url, "api_key_env": "BENCH_JUDGE_KEY",
               "concurrency": args.concurrency}
        t0 = time.perf_counter()
        counts = judge_samples(str(s), str(q), "bench", cfg, None, str(tmp / "journal"), str(tmp / "out.jsonl"),
                               cache_path=str(tmp / "cache.sqlite"))
        wall = time.perf_counter() - t0
        n = counts["asked"]
        print(f"first run: {n} judgments in {wall:.2f} s = {n / wall:.1f} judgments/s "
              f"(latency {args.latency * 1000:.0f} ms per call, concurrency {args.concurrency}, "
              f"server saw {server.request_count} requests, peak {server.max_in_flight} in flight)")
        before = server.request_count
        t0 = time.perf_counter()
        counts = judge_samples(str(s), str(q), "bench", cfg, None, str(tmp / "journal"), str(tmp / "out2.jsonl"),
                               cache_path=str(tmp / "cache.sqlite"))
        print(f"rerun: {counts['cache']} judgments from the cache in {time.perf_counter() - t0:.2f} s, "
              f"{server.request_count - before} requests")


if __name__ == "__main__":
    main()
