"""Rollout generation speed against the machine's roofline, both measured in this run.

The roofline of one decoding step at batch B is the slower of reading every weight once (weight
bytes / measured memory bandwidth) and the step's matmuls (2 x parameters x B FLOPs / measured
matmul rate); its tokens/s is B over that time. Generation is the rollout's own
(grpo/rollout.py: ``ConversationEnvironment.generate``, the scenarios' real first prompts, sampled
at the rollout's settings), timed whole, prefill included, as training sees it. Then a group's
first turn as training rolls it out (B / G prompts, each G times), with `rollout.share_prefix` on
and off, side by side.

    .venv/bin/python bench/generate.py [--model data/models/base] [--batches 1 8 16 32] [--tokens 32] [--dtype auto]

The last line gives the fractions of the roofline at batch 16 and 32 (issue 14's target: 0.7).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from grpo import scenarios
from grpo.config import RolloutConfig
from grpo.models import load_policy, rollout_dtype
from grpo.rollout import ConversationEnvironment


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls, in seconds (the least disturbed by other work)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_of(lambda: a @ b, repeats)


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large copy, counting what it reads and what it writes."""
    x = torch.empty(mb * 2**20 // 4, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / best_of(lambda: y.copy_(x), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/base", help="model directory (default: the pipeline's base model)")
    ap.add_argument("--prepared", default="data/prepared/train.parquet", help="scenarios whose first prompts are used")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--group", type=int, default=4, help="rows sharing a prompt in the shared-prefix comparison")
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the weights' dtype; auto: the rollouts' own (rollout.bf16 auto: bf16 where the CPU multiplies it natively)",
    )
    args = ap.parse_args()

    dtype = rollout_dtype("auto", torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_policy(args.model, "cpu", dtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops, bandwidth = matmul_flops(next(model.parameters()).dtype), memory_bandwidth()
    print(
        f"{next(model.parameters()).dtype}  threads {torch.get_num_threads()}  matmul {flops / 1e9:.0f} GFLOP/s  memory {bandwidth / 1e9:.1f} GB/s  "
        f"weights {weight_bytes / 1e6:.0f} MB ({params / 1e6:.0f}M parameters)"
    )
    env = ConversationEnvironment(tokenizer, RolloutConfig(max_new_tokens=args.tokens))
    pool = scenarios.from_frame(pd.read_parquet(args.prepared))
    prompts = [env.start(s, 0).input_ids for s in pool]
    # every row makes exactly --tokens tokens: eos is taken out of reach
    eos = env.tok.eos_token_id
    block = [lambda input_ids, scores: scores.index_fill(1, torch.tensor([eos]), float("-inf"))]
    env.generate(model, prompts[:2], max_new_tokens=4)  # warm-up
    fractions = {}
    for b in args.batches:
        rows = [prompts[i % len(prompts)] for i in range(b)]
        width = max(map(len, rows))
        seconds = best_of(lambda rows=rows: env.generate(model, rows, processors=block), args.repeats)
        measured = b * args.tokens / seconds
        step = max(weight_bytes / bandwidth, 2 * params * b / flops)
        roofline = b / step
        fractions[b] = measured / roofline
        print(
            f"batch {b:>2}: {measured:6.1f} tokens/s  roofline {roofline:6.1f}  fraction {fractions[b]:.2f}  "
            f"({seconds:.2f} s for {args.tokens} tokens, prompts padded to {width})"
        )
    for b in [b for b in args.batches if b >= args.group and b % args.group == 0]:
        rows = [prompts[i // args.group] for i in range(b)]
        speed = {}
        for share in (True, False):
            env.config = RolloutConfig(max_new_tokens=args.tokens, share_prefix=share)
            seconds = best_of(lambda rows=rows: env.generate(model, rows, processors=block), args.repeats)
            speed[share] = b * args.tokens / seconds
        print(
            f"batch {b:>2} as {b // args.group} groups of {args.group}: shared prefix {speed[True]:6.1f} tokens/s, "
            f"not shared {speed[False]:6.1f} (x{speed[True] / speed[False]:.2f})"
        )
    shown = [b for b in (16, 32) if b in fractions] or list(fractions)
    print("fraction of the roofline: " + ", ".join(f"batch {b} {fractions[b]:.2f}" for b in shown))


if __name__ == "__main__":
    main()
