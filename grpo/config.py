"""The base of every typed config in the library: a pydantic model that rejects unknown keys, so a
typo fails where the config is built instead of being ignored. Each module defines the config it
takes beside the code that uses it, as TRL keeps ``GRPOConfig`` beside its trainer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
