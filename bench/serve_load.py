"""Load benchmark of the OpenAI-compatible server (grpo/serving.py) on loopback.

Sends N chat requests at concurrency C, then the same N one at a time, to a server holding the
model, and prints p50/p99 latency, throughput (requests/s and completion tokens/s) for each, the
ratio of batched to sequential throughput, and the count of 5xx answers (must be 0).

    .venv/bin/python bench/serve_load.py [--model data/models/base] [-n 32] [-c 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from grpo.models import load_causal_lm, load_tokenizer
from grpo.serving import Limits, create_app, serve_in_thread

PROMPTS = [
    "My order is late, where is it?",
    "The app crashes when I open it.",
    "Which plan suits a team of eight?",
    "How do I add 1/3 and 1/4?",
    "I was charged twice this month.",
    "My wifi keeps dropping.",
]


def load_test(url: str, n: int, concurrency: int, max_tokens: int) -> dict:
    def one(i: int):
        body = {
            "model": "bench",
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        }
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/base", help="model directory (default: the pipeline's base model)")
    ap.add_argument("-n", type=int, default=32, help="requests per run")
    ap.add_argument("-c", type=int, default=16, help="concurrency of the batched run")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model, tok = load_causal_lm(args.model), load_tokenizer(args.model)
    app = create_app(
        lambda: (model, tok, "bench"), Limits(max_tokens=args.max_tokens, max_batch=args.c, max_concurrent=args.c * 2)
    )
    with serve_in_thread(app) as url:
        load_test(url, 2, 2, 4)  # warm-up
        batched = load_test(url, args.n, args.c, args.max_tokens)
        sequential = load_test(url, args.n, 1, args.max_tokens)
    for name, r in ((f"concurrency {args.c}", batched), ("sequential", sequential)):
        print(
            f"{name:>15}: p50 {r['p50']:6.2f} s  p99 {r['p99']:6.2f} s  {r['req_s']:5.2f} req/s  {r['tok_s']:6.1f} tok/s  "
            f"5xx {r['5xx']}  non-200 {r['non_200']}"
        )
    print(f"batched / sequential throughput (requests/s): {batched['req_s'] / sequential['req_s']:.2f}")


if __name__ == "__main__":
    main()
