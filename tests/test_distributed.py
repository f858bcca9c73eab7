"""train_policy as several processes on the CPU: torchrun with gloo, started by the stage itself, on
the tiny models in a temporary copy of the repo whose stages up to calibrate ran once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import torch
from conftest import BIN, make_project, mlflow_client, sh, write_params
from safetensors.torch import load_file

TRAIN = [sys.executable, "-m", "tasks.train_policy"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    project, env = make_project(tmp_path_factory.mktemp("distributed"), tiny_model_dir)
    sh([str(BIN / "dvc"), "repro", "calibrate"], project, env)
    return project, env


def configure(project, **train_policy) -> None:
    write_params(
        project / "params.yaml", {f"train_policy.{k}": v for k, v in train_policy.items()}, project / "params.yaml"
    )


def policy(project) -> dict[str, torch.Tensor]:
    return load_file(project / "data/models/policy/model.safetensors")


def test_two_ranks_take_the_same_steps_as_one_process(project):
    """The same global batch and seed in 2 processes and in 1: every episode samples from its own
    seeded stream, so the rollouts are the same (equal rewards at every step, the later steps
    sampled by the updated policy), and the update is the same up to float rounding.

    Tolerance: the fp32 gradient is summed in another order (each rank over its own sequences, then
    DDP adds the ranks' sums), and the log-probs come from differently padded micro-batches; both
    change values at float rounding, about 1e-7 relative. Adam then divides each gradient by its
    running RMS plus eps (1e-8), so where a gradient is near zero the rounding becomes a step of up
    to lr x rounding / eps. Measured: the merged weights moved by up to 0.070 from the base, and
    the two runs differed by at most 1.6e-5, 2.3e-4 of that (4.7e-7 on other labels: it depends on
    how many gradients sit near zero). The bound is 1e-3 of the movement; one different episode
    changes the advantages, and so the update, by a share of order 1."""
    project, env = project
    # in fp32: bf16 autocast rounds at about 1e-3 relative, far above the bounds below; so do bf16
    # rollouts, where a batch of another shape may round a logit to another sampled token
    write_params(project / "params.yaml", {"rollout.bf16": False}, project / "params.yaml")
    configure(project, steps=3, learning_rate=0.01, bf16=False, distributed={"world_size": 2})
    out = sh([str(BIN / "dvc"), "repro", "train_policy"], project, env)  # dvc repro starts torchrun
    assert "starting 2 ranks under torchrun" in out and "rank 1 of 2 on cpu" in out
    two, two_curve = policy(project), pd.read_csv(project / "plots/train.csv")
    base = load_file(project / "data/models/base/model.safetensors")

    configure(project, distributed={"world_size": 1})
    out = sh(TRAIN, project, env)
    assert "torchrun" not in out
    one, one_curve = policy(project), pd.read_csv(project / "plots/train.csv")

    assert list(two_curve["step"]) == [1, 2, 3]
    for column in ("reward_mean", "reward_std", "completion_length", "tool_calls"):
        assert list(two_curve[column]) == pytest.approx(list(one_curve[column]), abs=1e-6), column
    assert two_curve["loss"].tolist() == pytest.approx(one_curve["loss"].tolist(), abs=1e-5)
    moved = max((one[k] - base[k]).abs().max().item() for k in one)
    assert moved > 1e-2  # the policy did move
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-3 * moved

    # rank 0 logged each step to the stage's MLflow run
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("grpo-agents")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train_policy'", order_by=["start_time ASC"])
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "reward_mean")]
    assert steps == [1, 2, 3] and "seconds_per_step" in runs[0].data.metrics


def rank_process(rank: int, timeout: float = 120) -> psutil.Process:
    """The process torchrun started as ``rank``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "tasks.train_policy" in (p.info["cmdline"] or []) and p.environ().get("RANK") == str(rank):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process")


def test_a_killed_rank_fails_the_stage_keeps_the_policy_and_a_rerun_resumes(project):
    project, env = project
    configure(project, steps=12, checkpoint_every=2, distributed={"world_size": 2})
    weights = project / "data/models/policy/model.safetensors"
    before = weights.read_bytes() if weights.exists() else None  # the first test's policy, when it ran
    ckpt = project / "data/checkpoints/policy/checkpoint.pt"
    run = subprocess.Popen(TRAIN, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = rank_process(1)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), "no checkpoint written"
    victim.send_signal(signal.SIGKILL)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 1, out[-3000:]
    assert "torchrun with 2 processes exited" in out and "Traceback" not in out.split("torchrun with 2")[-1]
    assert (weights.read_bytes() if weights.exists() else None) == before
    assert not [p for p in (project / "data/models").iterdir() if p.name.startswith(".")]  # no half-written dir
    saved = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= saved < 12

    # the rerun as on several nodes: torchrun started by hand; the stage starts no second one
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("grpo-agents")
    runs_before = len(client.search_runs([exp.experiment_id], "tags.stage = 'train_policy'"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = sh([*torchrun, "-m", "tasks.train_policy"], project, env)
    assert "starting 2 ranks" not in out and f"resuming from {ckpt.relative_to(project)} at step {saved}" in out
    assert pd.read_csv(project / "plots/train.csv")["step"].tolist() == list(range(1, 13))
    assert not ckpt.parent.exists()  # removed once training completes
    # one MLflow run for the rerun: rank 0's; rank 1 opened none
    assert len(client.search_runs([exp.experiment_id], "tags.stage = 'train_policy'")) == runs_before + 1


def test_trl_backend_with_deepspeed_zero2_on_gloo_trains_and_writes_a_policy_that_loads(project):
    from grpo.models import load_policy
    from grpo.rollout import ConversationEnvironment
    from grpo.scenarios import from_frame

    project, env = project
    configure(
        project, backend="trl", steps=2, checkpoint_every=0, distributed={"world_size": 2, "strategy": "deepspeed"}
    )
    out = sh(TRAIN, project, env)
    assert "rank 0 of 2, accelerate DEEPSPEED (ZeRO stage 2)" in out and "rank 1 of 2" in out
    assert pd.read_csv(project / "plots/train.csv")["step"].tolist() == [1, 2]
    model, tokenizer = load_policy(str(project / "data/models/policy"), "cpu")
    scenario = from_frame(pd.read_parquet(project / "data/prepared/train.parquet"))[0]
    [episode] = ConversationEnvironment(tokenizer).rollout(model, [scenario], 1)
    assert episode.turns >= 1 and sum(episode.assistant_mask) > 0


def test_distributed_settings_are_checked_when_params_load():
    from grpo.config import GRPOConfig

    with pytest.raises(ValueError, match="scenarios_per_step 3 must divide by distributed.world_size 2"):
        GRPOConfig(scenarios_per_step=3, distributed={"world_size": 2})
    with pytest.raises(ValueError, match="strategy deepspeed runs through TRL"):
        GRPOConfig(distributed={"world_size": 2, "strategy": "deepspeed"})
    with pytest.raises(ValueError, match="only ZeRO stage 2"):
        GRPOConfig(backend="trl", distributed={"world_size": 2, "strategy": "deepspeed", "zero_stage": 3})


def test_the_gpu_path_picks_the_rank_s_gpu_nccl_and_bf16(monkeypatch):
    """What runs on CUDA, checked on the CPU: the rank's own GPU, NCCL, bf16 weights and autocast."""
    from grpo import distributed
    from grpo.models import autocast, policy_dtype, use_bf16

    assert distributed.device("auto") == torch.device("cpu") or torch.cuda.is_available()
    assert policy_dtype(torch.device("cpu")) == torch.float32
    with autocast(torch.device("cpu"), use_bf16(False, torch.device("cpu"))):  # off: fp32 stays fp32
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), use_bf16(True, torch.device("cpu"))):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16

    picked, backends = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", backends.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    where = distributed.device("auto")
    assert where == torch.device("cuda", 1) and picked == [1]
    assert policy_dtype(where) == torch.bfloat16 and use_bf16("auto", where)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    distributed.init(where)
    assert backends == ["nccl"]
    distributed.init(torch.device("cpu"))
    assert backends == ["nccl", "gloo"]
