"""params.yaml as one typed, validated model: the only place that knows the file's layout.

Each section is a pydantic model that rejects unknown keys. The sections the library uses are the
library's own configs (``grpo.rollout.RolloutConfig``, ``grpo.trainer.GRPOConfig``, ...), so a
stage hands them to ``grpo/`` as they are; the sections only the pipeline reads are defined here.
A stage names the sections it reads as the parameters of its ``run`` function (tasks/), which is
what it is given, and what tests/test_flow_order.py checks against each stage's ``params`` in
dvc.yaml.
"""

from __future__ import annotations

import difflib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from grpo.calibration import UNIT_RANGE, CalibrationConfig
from grpo.config import Config, EvaluateConfig, FitConfig, GRPOConfig, Limits, RolloutConfig, SFTConfig
from grpo.judge import JudgeConfig
from grpo.rewards import RewardConfig

PARAMS_FILE = Path("params.yaml")


class Paths(Config):
    """Every file and directory the stages read and write (templated into dvc.yaml)."""

    scenarios: str
    imports: str
    expectations: str
    base_model: str
    prepared: str
    labels: str
    reward_model: str
    calibration: str
    sft_model: str
    policy: str
    checkpoints: str
    judge_cache: str
    metrics: str
    plots: str
    mlflow_db: str
    mlflow_artifacts: str
    eval_sets: str
    champion: str

    def policy_start(self, sft: SFTConfig) -> str:
        """The policy GRPO starts from, its KL reference, and what evaluate compares as ``sft``:
        the SFT warm start, or the base model when ``sft.enabled`` is false."""
        return self.sft_model if sft.enabled else self.base_model


class MlflowParams(Config):
    experiment: str


class BaseModelParams(Config):
    source: str = Field(description="a local directory, a .gguf path, pkg:<package>/<file.gguf>, or a Hugging Face id")


class ExpandParams(Config):
    tones: int = Field(ge=0, le=6)
    order_states: int = Field(ge=0)
    products: int = Field(ge=0)
    multi_issue_per_domain: int = Field(ge=0)


class PrepareParams(Config):
    eval_fraction: float = Field(gt=0, lt=1)
    expand: ExpandParams
    dedup_threshold: float = Field(gt=0, le=1)
    mask_pii: bool = True
    sources: list[dict[str, Any]] = Field([], description="imports; see README 'Bring your own conversations'")


class LabelParams(Config):
    max_scenarios: int | None = Field(ge=1, description="training scenarios labelled; null: all")
    group_size: int = Field(ge=2)
    chunk_scenarios: int = Field(ge=1)


class JudgeParams(JudgeConfig):
    """The judge (``grpo.judge.JudgeConfig``) and how label uses it."""

    enabled: bool = True
    max_groups: int = Field(ge=0, description="scenario groups sent to the judge; the rest are heuristic")
    max_fallback_rate: float = Field(1.0, ge=0, le=1)


class TrainRewardParams(FitConfig):
    """The reward model's shape and fitting (``grpo.reward_model.FitConfig``), and the stage's gate."""

    hidden: int = Field(ge=1)
    max_tokens: int = Field(ge=8, description="encoder token budget per conversation")
    val_fraction: float = Field(gt=0, lt=1)
    min_spearman: float = Field(ge=-1, le=1, description="the stage fails below this held-out Spearman")

    def fit_config(self) -> FitConfig:
        return FitConfig(**self.model_dump(include=set(FitConfig.model_fields)))


class RegisterParams(Config):
    model_name: str
    reward_model_name: str
    metric: str
    min_improvement: float
    require_ci: bool = True


class Profile(Config):
    """A train_policy preset: what `profile` fills in where train_policy leaves a value null."""

    learning_rate: float = Field(gt=0)
    beta: float = Field(ge=0)
    epsilon: float = Field(gt=0)
    epsilon_high: float = Field(gt=0)
    steps: int = Field(ge=1)
    group_size: int = Field(ge=2)


# Sections a stage receives already resolved from others: train_policy's null values come from
# profiles[profile], so a stage that reads train_policy depends on both (tests/test_flow_order.py).
RESOLVED_FROM = {"train_policy": ("profile", "profiles")}


class ServeParams(Config):
    alias: str
    host: str
    port: int = Field(ge=1, le=65535)
    api_key_env: str
    poll_seconds: float = Field(gt=0)
    limits: Limits


# pydantic warns that the field `register` shadows ABCMeta.register, a method of the class, not of
# its instances: harmless, and params.yaml's key stays as users know it.
warnings.filterwarnings("ignore", 'Field name "register" in "Params" shadows', UserWarning)


class Params(Config):
    """The whole of params.yaml."""

    seed: int
    device: Literal["auto", "cpu", "cuda"] = "auto"
    profile: str = "balanced"
    profiles: dict[str, Profile]
    paths: Paths
    mlflow: MlflowParams
    base_model: BaseModelParams
    encoder: str
    prepare: PrepareParams
    rollout: RolloutConfig
    reward: RewardConfig
    label: LabelParams
    judge: JudgeParams
    train_reward: TrainRewardParams
    calibrate: CalibrationConfig
    sft: SFTConfig
    train_policy: GRPOConfig
    evaluate: EvaluateConfig
    register: RegisterParams
    serve: ServeParams

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("train_policy"), dict) and "seed" in data["train_policy"]:
            raise ValueError("train_policy.seed: the seed is the top-level `seed`, shared by every stage")
        return data

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        """train_policy's null (or absent) preset keys take the selected profile's values."""
        if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
            return data
        name, presets = data.get("profile", "balanced"), data["profiles"]
        if name not in presets:
            close = difflib.get_close_matches(str(name), list(presets), n=1)
            hint = f"did you mean {close[0]}?" if close else f"the profiles are {', '.join(presets)}"
            raise ValueError(f"profile: {name!r} is not one of profiles; {hint}")
        preset = presets[name] if isinstance(presets[name], dict) else {}
        section = data.get("train_policy") or {}
        if isinstance(section, dict):
            resolved = {k: v for k, v in section.items() if v is not None}
            data = {
                **data,
                "train_policy": {**{k: v for k, v in preset.items() if k in Profile.model_fields}, **resolved},
            }
        return data

    @model_validator(mode="after")
    def _geometric_needs_unit_range(self) -> Params:
        if self.reward.aggregate == "geometric":
            methods = {k: self.calibrate.per_component.get(k, self.calibrate.method) for k in self.reward.weights}
            bad = sorted(k for k, m in methods.items() if m not in UNIT_RANGE)
            if bad:
                raise ValueError(
                    f"reward.aggregate geometric needs every component in [0, 1], but {bad} would be calibrated "
                    f"with {sorted({methods[k] for k in bad})}; set calibrate.method (or calibrate.per_component) "
                    f"to one of {list(UNIT_RANGE)}"
                )
        return self

    def sections(self, names) -> dict[str, Any]:
        """The named top-level sections, as a stage's ``run`` takes them."""
        return {n: getattr(self, n) for n in names}


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; a problem raises ``ValueError`` naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run from the repository root") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {'; '.join(describe(err) for err in e.errors())}") from None


def set_params(overrides: dict[str, Any], path: str | Path = PARAMS_FILE) -> Params:
    """Write ``overrides`` (dotted keys, as ``dvc exp run -S`` takes them) into params.yaml, keeping
    its comments and layout, validated first and replaced atomically; returns the typed params.

    What a run ran with is then in params.yaml, where dvc.lock, ``git diff`` and the stages' MLflow
    runs all see it. ruamel.yaml (which DVC itself uses for ``-S``) keeps the comments."""
    from ruamel.yaml import YAML

    path, rt = Path(path), YAML()
    rt.preserve_quotes, rt.width = True, 4096  # no re-wrapping of long lines
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = rt.load(path.read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        section = data
        for i, name in enumerate(parents):
            if not isinstance(section, dict) or name not in section:
                raise ValueError(f"{path}: {'.'.join(parents[: i + 1])}: no such section (setting {key})")
            section = section[name]
        section[last] = value
    buf = io.StringIO()
    rt.dump(data, buf)
    try:
        params = Params.model_validate(yaml.safe_load(buf.getvalue()))
    except ValidationError as e:
        raise ValueError(f"{path}: {'; '.join(describe(err) for err in e.errors())}") from None
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return params


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train_policy.steps=4", ...]`` -> ``{"train_policy.steps": 4}``; values are read as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train_policy.learning_rate=0.001")
        out[key.strip()] = yaml.safe_load(value)
    return out


def describe(error: dict) -> str:
    """One validation error as ``key.path: message``; an unknown key gets the closest valid name."""
    loc = ".".join(map(str, error["loc"]))
    msg = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if error["type"] != "extra_forbidden":
        return f"{loc}: {msg}" if loc else msg
    model = Params
    for key in error["loc"][:-1]:
        model = getattr(model, "model_fields", {}).get(key)
        model = model.annotation if model is not None else None
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
    return f"{loc}: unknown key; {hint}"
