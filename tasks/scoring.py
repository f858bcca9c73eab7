"""What label, train_policy and evaluate share: the composite reward and the judge. (Apart from
tasks/common.py, so that the stages that do not score depend on none of this code in dvc.yaml.)"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("tasks")


def load_reward(params: dict):
    """The composite reward of train_policy and evaluate: calibrated components, learned score included."""
    from grpo.io import read_json
    from grpo.models import pick_device
    from grpo.reward_model import RewardModel
    from grpo.rewards import CompositeReward

    paths = params["paths"]
    rm = None
    if "reward_model" in params["reward"]["weights"]:
        rm = RewardModel.load(paths["reward_model"], str(pick_device(params["device"])))
    return CompositeReward(params["reward"], read_json(paths["calibration"])["components"], rm, params["encoder"])


@contextlib.contextmanager
def judge_endpoint(params: dict, model, tokenizer):
    """(base_url, cache identity): the configured endpoint, or the base policy served on loopback."""
    j = params["judge"]
    if j["base_url"]:
        yield j["base_url"], f"{j['model']}@{j['base_url']}"
        return
    from grpo.serving import Limits, create_app, serve_in_thread

    limits = Limits(max_tokens=j["max_tokens"], max_prompt_tokens=8192, max_concurrent=64, max_batch=16)
    app = create_app(lambda: (model, tokenizer, j["model"]), limits)
    with serve_in_thread(app) as url:
        log.info("judge: %s served on %s", params["base_model"]["source"], url)
        yield f"{url}/v1", f"local:{params['base_model']['source']}"


def run_judge(params: dict, model, tokenizer, groups: list[tuple[str, list]]) -> list:
    """Judge ``(domain, conversations)`` groups with the configured judge (grpo/judge.py)."""
    from grpo.judge import Judge, JudgeConfig

    j = params["judge"]
    with judge_endpoint(params, model, tokenizer) as (url, identity):
        config = JudgeConfig(model=j["model"], base_url=url, api_key_env=j["api_key_env"], identity=identity,
                             timeout_s=j["timeout_s"], max_retries=j["max_retries"], max_concurrency=j["max_concurrency"],
                             max_tokens=j["max_tokens"], temperature=j["temperature"])
        return Judge(config).judge_groups(groups, params["paths"]["judge_cache"])
