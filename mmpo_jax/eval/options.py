"""What `mmpo-jax eval` and `mmpo-jax sweep` are asked to compute besides the preference
metrics (`EvalOptions`, the eval flags) and the win rate's defaults: a leaf module (no jax,
no model code), so the command modules can build their flags from it at `--help` time."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Literal

from mmpo_jax.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 64  # the demo answers are at most 22 builtin:tiny tokens
DEFAULT_BATCH_SIZE = 16


@dataclass
class EvalOptions:
    """What `evaluate_trainer` computes besides the preference metrics (the eval flags)."""

    capability: bool = False
    capability_reference: bool = False
    capability_template: Literal["plain", "chat"] = "plain"
    capability_file: str | None = None
    capability_limit: int = 0
    win_rate: bool = False
    win_rate_limit: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    win_rate_batch_size: int = DEFAULT_BATCH_SIZE
    save_generations: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalOptions":
        names = [f for f in cls.__dataclass_fields__]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def check(self) -> None:
        """A UserError naming the bad option, before anything is loaded."""
        if self.capability_reference and not self.capability:
            raise UserError("--capability-reference needs --capability")
        if self.capability_limit < 0:
            raise UserError(f"--capability-limit={self.capability_limit}: must be >= 0 (0 = all items)")
        if self.save_generations and not self.win_rate:
            raise UserError("--save-generations needs --win-rate")
        if self.win_rate_limit < 0:
            raise UserError(f"--win-rate-limit={self.win_rate_limit}: must be >= 0 (0 = every test prompt)")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens={self.max_new_tokens}: must be >= 1")
        if self.win_rate_batch_size < 1:
            raise UserError(f"--win-rate-batch-size={self.win_rate_batch_size}: must be >= 1")

    def settings(self) -> dict[str, Any]:
        """The options that change the numbers (not where generations are saved)."""
        out = asdict(self)
        out.pop("save_generations")
        out.pop("win_rate_batch_size")  # greedy answers do not depend on the batching
        return out
