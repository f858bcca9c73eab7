"""Load benchmark of the OpenAI-compatible server (grpo/serving.py) on loopback.

Sends N chat requests at each concurrency C, then the same N one at a time, to a server holding
the model, and prints p50/p99 latency, throughput (requests/s and completion tokens/s) for each,
the count of 5xx answers (must be 0), and the ratio of batched to sequential throughput. Then
streams N requests at concurrency 1 and at the first C: time to the first content token (p50,
p99) and each stream's tokens/s after it (median). ``--max-tokens 8 64`` gives the requests
those limits in turn (mixed lengths, where continuous batching lets short requests leave early).

    .venv/bin/python bench/serve_load.py [--model data/models/base] [-n 32] [-c 8 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from grpo.config import Limits
from grpo.models import load_causal_lm, load_tokenizer
from grpo.serving import create_app, serve_in_thread

PROMPTS = [
    "My order is late, where is it?",
    "The app crashes when I open it.",
    "Which plan suits a team of eight?",
    "How do I add 1/3 and 1/4?",
    "I was charged twice this month.",
    "My wifi keeps dropping.",
]


def request(i: int, max_tokens: list[int], stream: bool = False) -> dict:
    """The i-th request's body: one of PROMPTS and one of ``max_tokens`` in turn, sampled at 0.7."""
    return {
        "model": "bench",
        "max_tokens": max_tokens[i % len(max_tokens)],
        "temperature": 0.7,
        "stream": stream,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
    }


def load_test(url: str, n: int, concurrency: int, max_tokens: list[int]) -> dict:
    def one(i: int):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=request(i, max_tokens), timeout=600)
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        return time.perf_counter() - t0, r.status_code, tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "req_s": n / wall,
        "tok_s": sum(r[2] for r in results) / wall,
        "5xx": sum(r[1] >= 500 for r in results),
        "non_200": sum(r[1] != 200 for r in results),
    }


def stream_test(url: str, n: int, concurrency: int, max_tokens: list[int]) -> dict:
    def one(i: int):
        t0, times = time.perf_counter(), []
        body = request(i, max_tokens, stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter() - t0)
        return times

    with ThreadPoolExecutor(concurrency) as pool:
        streams = [t for t in pool.map(one, range(n)) if t]
    first = sorted(t[0] for t in streams)
    rates = [(len(t) - 1) / (t[-1] - t[0]) for t in streams if len(t) > 1 and t[-1] > t[0]]
    return {
        "ttft_p50": statistics.median(first),
        "ttft_p99": first[min(len(first) - 1, int(0.99 * len(first)))],
        "tok_s": statistics.median(rates) if rates else float("nan"),
        "empty": n - len(streams),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/base", help="model directory (default: the pipeline's base model)")
    ap.add_argument("-n", type=int, default=32, help="requests per run")
    ap.add_argument("-c", type=int, nargs="+", default=[8, 32], help="concurrencies of the batched runs")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[32], help="each request's limit, in turn")
    ap.add_argument(
        "--batch-wait", type=float, default=Limits().batch_wait_s, help="seconds the batcher waits for more requests"
    )
    args = ap.parse_args()
    model, tok = load_causal_lm(args.model), load_tokenizer(args.model)
    top = max(args.c)
    limits = Limits(
        max_tokens=max(args.max_tokens), max_batch=top, max_concurrent=top * 2, batch_wait_s=args.batch_wait
    )
    app = create_app(lambda: (model, tok, "bench"), limits)
    with serve_in_thread(app) as url:
        load_test(url, 2, 2, [4])  # warm-up
        runs = {f"concurrency {c}": load_test(url, args.n, c, args.max_tokens) for c in args.c}
        runs["sequential"] = sequential = load_test(url, args.n, 1, args.max_tokens)
        streams = {c: stream_test(url, args.n, c, args.max_tokens) for c in (1, args.c[0])}
    for name, r in runs.items():
        print(
            f"{name:>15}: p50 {r['p50']:6.2f} s  p99 {r['p99']:6.2f} s  {r['req_s']:5.2f} req/s  {r['tok_s']:6.1f} tok/s  "
            f"5xx {r['5xx']}  non-200 {r['non_200']}"
        )
    for c, r in streams.items():
        print(
            f"stream, concurrency {c:>2}: first token p50 {r['ttft_p50']:5.2f} s  p99 {r['ttft_p99']:5.2f} s  "
            f"{r['tok_s']:5.1f} tok/s per stream  ({r['empty']} with no content)"
        )
    for c in sorted(args.c, reverse=True):  # the smallest last: the target is at concurrency 8
        ratio = runs[f"concurrency {c}"]["req_s"] / sequential["req_s"]
        print(f"batched (concurrency {c}) / sequential throughput (requests/s): {ratio:.2f}")


if __name__ == "__main__":
    main()
