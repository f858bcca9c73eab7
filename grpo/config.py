"""The library's typed configs, one per part (params.yaml's sections are built from them in
grpo_agents/params.py). Each is a pydantic model that rejects unknown keys, so a typo fails where
the config is built instead of being ignored.

They live here, apart from the code that takes them (as TRL keeps ``GRPOConfig`` in its own
``grpo_config.py``), so that reading and checking ``params.yaml`` imports no torch: the modules
that use them import torch, transformers and peft (``import grpo_agents.params`` took 7.0 s with
them, 0.6 s without; ``python -X importtime``), and the registry commands (``grpo-agents
champion``, ``promote``, ``rollback``) paid that for nothing."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DistributedConfig(Config):
    """params.yaml ``train_policy.distributed``."""

    world_size: int = Field(1, ge=1, description="processes on this machine; 1 = one process, no torchrun")
    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="ddp: PyTorch DDP (both backends); deepspeed: ZeRO through accelerate (backend trl)"
    )
    zero_stage: int = Field(2, description="DeepSpeed ZeRO stage (strategy deepspeed): 2")

    @field_validator("zero_stage")
    @classmethod
    def _stage_two(cls, stage: int) -> int:
        # Measured: under ZeRO-3 transformers partitions every model loaded after its config is set
        # (the reward's sentence encoder, loaded on first use, then fails), and the trained LoRA
        # cannot be merged without gathering the partitioned weights. ZeRO-2 shards what matters
        # for a LoRA run: optimizer state and gradients.
        if stage != 2:
            raise ValueError(f"zero_stage {stage}: only ZeRO stage 2 is supported (README 'Distributed training')")
        return stage


class RolloutConfig(Config):
    """How episodes are sampled (params.yaml ``rollout``)."""

    max_turns: int = Field(2, ge=1, description="agent turns per episode (user or tool messages in between)")
    max_new_tokens: int = Field(48, ge=1, description="per agent turn")
    user: Literal["scripted", "llm"] = Field(
        "scripted", description="scripted: the scenario's follow-ups; llm: the base model plays persona and goal"
    )
    user_max_tokens: int = Field(32, ge=1, description="per LLM-user message")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    strict_tool_calls: bool = Field(
        True,
        description="a reply that begins like a tool call is decoded under the call's JSON schema (one of the "
        "scenario's tools, its arguments), so a call cannot be malformed, and an order or account id in it must be "
        "one the user wrote; whether to call stays the policy's choice",
    )
    share_prefix: bool = Field(
        True,
        description="prefill a prompt that several rows share once (a group's first turn), not once per row, "
        "and keep each episode's KV cache for its next turn (TurnCache)",
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="generate with bf16 weights (label's and evaluate's policies loaded in bf16; train_policy "
        "samples from a bf16 copy of the policy with its adapters merged, native backend); auto: where the "
        "device multiplies bf16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX)",
    )


class SFTConfig(Config):
    """params.yaml ``sft``."""

    enabled: bool = Field(True, description="false: train_policy starts from the base model, as before")
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    max_length: int = Field(512, ge=16, description="tokens per demonstration (longer ones are cut)")
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast for SFT's forwards and backward (the LoRA weights and optimiser stay fp32); "
        "auto: where the device multiplies bf16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX)",
    )


class GRPOConfig(Config):
    """GRPO training settings (params.yaml ``train_policy``), shared by both backends."""

    backend: Literal["native", "trl"] = Field("native", description="native: this loop; trl: grpo/trl_backend.py")
    steps: int = Field(16, ge=1, description="optimisation steps (one generation round each)")
    scenarios_per_step: int = Field(4, ge=1, description="groups per step")
    group_size: int = Field(4, ge=2, description="completions per scenario")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: Literal["constant", "linear"] = Field(
        "constant", description="constant, or linear decay to 0 over the run (no warm-up); both backends"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay, both backends (TRL's default 0)")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    beta: float = Field(0.04, ge=0, description="k3 KL weight; 0 skips the reference forward entirely")
    use_bias_correction_kl: bool = Field(
        True, description="weight the k3 KL by the importance ratio (TRL's option and default: unbiased KL gradient)"
    )
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float = Field(0.28, gt=0)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    leave_one_out: bool = Field(False, description="RLOO baseline instead of the group mean")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token (GRPO) | sequence (GSPO)"
    )
    num_iterations: int = Field(1, ge=1, description="updates per generation round")
    micro_batch_size: int = Field(8, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 disables them")
    share_prefix: bool = Field(
        True,
        description="native: forward a prompt that rows of a micro-batch share once per forward of the update "
        "(same loss up to float rounding); the trl backend forwards every row whole",
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast for the update's forwards and backward, both backends (the weights, LoRA "
        "adapters and optimiser stay as loaded); auto: where the device multiplies bf16 natively (a CUDA GPU "
        "that supports it, a CPU with AVX512-BF16 or AMX)",
    )
    sampler_is: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = Field(
        "sequence_mask",
        description="native: how the loss corrects for a sampler whose numerics differ from the update's (a bf16 "
        "rollout copy, rollout.bf16), with the ratio of the update's to the sampler's log-probs; TRL's "
        "vllm_importance_sampling_mode and default. none: no correction",
    )
    sampler_is_max: float | None = Field(3.0, gt=0, description="the ratio's upper bound (TRL's clip_max)")
    sampler_is_min: float | None = Field(None, ge=0, description="the ratio's lower bound (TRL's clip_min)")
    turn_credit: bool = Field(False, description="each agent turn's tokens get their own discounted return")
    turn_gamma: float = Field(0.9, ge=0, le=1, description="discount of later turns' contributions (turn_credit)")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _compatible(self) -> GRPOConfig:
        n = self.distributed.world_size
        if self.scenarios_per_step % n:
            raise ValueError(
                f"scenarios_per_step {self.scenarios_per_step} must divide by distributed.world_size {n}: "
                "each rank rolls out whole groups"
            )
        if self.distributed.strategy == "deepspeed" and self.backend != "trl":
            raise ValueError(
                "distributed.strategy deepspeed runs through TRL and accelerate: set backend: trl, or strategy: ddp"
            )
        if self.turn_credit and self.importance_sampling_level == "sequence":
            raise ValueError(
                "turn_credit gives each turn its own advantage; it cannot be combined with "
                "importance_sampling_level: sequence (GSPO), which shares one ratio per sequence"
            )
        if self.backend == "trl" and (self.turn_credit or self.leave_one_out):
            raise ValueError(
                "backend trl: turn_credit and leave_one_out are native-only; set them to false or use backend: native"
            )
        return self

    def warnings(self) -> list[str]:
        """Settings that run but are probably not what was meant (TRL warns about the first)."""
        out = []
        if self.importance_sampling_level == "sequence":
            if self.loss_type in ("bnpo", "dr_grpo", "dapo"):
                out.append(
                    f"importance_sampling_level: sequence with loss_type {self.loss_type} sums per-token terms, "
                    "which weights each sequence by its length instead of optimising the per-sequence (GSPO) "
                    "objective; GSPO uses loss_type: grpo"
                )
            if max(self.epsilon, self.epsilon_high) > 0.01:
                out.append(
                    f"importance_sampling_level: sequence clips one ratio per sequence, the exp of a mean of "
                    f"token log-ratios, which stays close to 1: epsilon {self.epsilon} / epsilon_high "
                    f"{self.epsilon_high} will almost never clip (the GSPO paper uses about 3e-4 / 4e-4)"
                )
        return out


class FitConfig(Config):
    """How the reward model is trained (the fitting part of params.yaml ``train_reward``)."""

    epochs: int = Field(300, ge=1, description="phase 1: head only, on cached embeddings (full batch)")
    learning_rate: float = Field(1e-3, gt=0)
    patience: int = Field(30, ge=1, description="epochs without a better validation loss before stopping")
    unfreeze_epochs: int = Field(0, ge=0, description="phase 2: encoder and head together; 0 skips it")
    encoder_learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(16, ge=1, description="phase 2 mini-batches")
    warmup_fraction: float = Field(0.1, ge=0, le=1, description="linear warmup share of each phase's steps")
    max_grad_norm: float = Field(1.0, gt=0)
    pairwise_weight: float = Field(0.0, ge=0, description="weight of the Bradley-Terry loss on pairs within a group")
    weight_decay: float = Field(1e-4, ge=0)


class ExtraSet(Config):
    """A second held-out set, imported as prepare imports (grpo/imports.py)."""

    source: dict[str, Any] = Field(description="a prepare.sources entry: path, format, domain, columns ...")
    max_scenarios: int | None = Field(24, ge=1, description="a fixed, seeded subset; null: all")


class EvaluateConfig(Config):
    """How policies are compared (params.yaml ``evaluate``)."""

    max_scenarios: int | None = Field(ge=1, description="held-out scenarios (fixed, domain-balanced subset); null: all")
    judge_scenarios: int = Field(ge=0, description="scenarios whose pair of conversations the judge compares")
    min_judged: int = Field(ge=1, description="judged pairs needed before a losing win rate flags a run")
    judge_alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="a losing win rate flags a run only when a one-sided sign test over the decisive pairs "
        "(ties excluded) says the judge prefers the other policy at this level",
    )
    min_judge_agreement: float = Field(
        ge=0,
        le=1,
        description="the judge's agreement with the heuristic score in label (within-group pairwise, chance "
        "0.5) below which its win rates are reported but flag nothing",
    )
    max_length_ratio: float = Field(gt=1, description="reply-length drift (either way) that flags a run")
    samples_per_scenario: int = Field(ge=1)
    bootstrap: int = Field(ge=100, description="bootstrap resamples for the paired CI")
    ci_level: float = Field(gt=0, lt=1)
    extra_sets: dict[str, ExtraSet] = Field(
        default_factory=dict, description="more held-out sets by name, e.g. real conversations; see README"
    )


class Limits(Config):
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(256, ge=1, description="cap on a request's max_tokens")
    max_concurrent: int = Field(32, ge=1, description="requests queued or running; more get 429")
    max_batch: int = Field(16, ge=1, description="requests decoding together in the running batch")
    batch_wait_s: float = Field(
        0.1,
        ge=0,
        description="how long a request waits for others to be prefilled with it before it joins the running "
        "batch (bench/README.md)",
    )
