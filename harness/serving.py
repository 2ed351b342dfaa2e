"""The marked model as its owner serves it: the one place where queries reach a deployment.

A method that marks *answers* rather than weights (DAWN: a keyed wrong label for a secret share
of queries) declares ``serves = True`` and a ``serve`` hook; every answer of its deployment then
passes through that hook. Extraction attacks (``Attack.queries_api``) ask the deployment through
``ctx.query``; the engine counts the queries, and the owner's side of the API keeps the
watermarked answers it gave (saved with the attack's artifact, never in a row) so that the
method's ``verify`` can judge the stolen copy on them (``ctx.api_log``). Methods that do not
serve are answered by the model's own logits and log nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from harness.training import as_float, autocast

LOG_LIMIT = 10_000  # watermarked answers the owner's log keeps per attack


class Served(nn.Module):
    """`model` behind its method's ``serve`` hook: ``forward`` returns the served answers and
    leaves the mask of the answers the method altered in ``last_marked``."""

    def __init__(self, model: nn.Module, method: Any, secret: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.method, self.secret = model, method, secret
        self.last_marked: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        answers, marked = self.method.serve(x, self.model(x), self.secret)
        self.last_marked = marked
        return answers


def deployed(model: nn.Module, method: Any, secret: dict[str, Any]) -> nn.Module:
    """The model as served: behind ``method.serve`` when the method marks answers."""
    return Served(model, method, secret) if getattr(method, "serves", False) else model


class API:
    """The served deployment as an attacker reaches it (``ctx.query``): answers batches of
    queries (uint8 or float images), counts them, and logs the watermarked answers (owner side)."""

    def __init__(self, model: nn.Module, device: str, batch_size: int = 512) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.queries = 0
        self.watermarked = 0
        self._log_x: list[torch.Tensor] = []
        self._log_answers: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            with autocast(self.device):
                answers = self.model(as_float(xb, self.device)).float().cpu()
            out.append(answers)
            marked = getattr(self.model, "last_marked", None)
            if marked is not None and bool(marked.any()):
                marked = marked.cpu()
                self.watermarked += int(marked.sum())
                room = LOG_LIMIT - sum(len(a) for a in self._log_answers)
                if room > 0:
                    self._log_x.append(xb[marked][:room].cpu())
                    self._log_answers.append(answers[marked][:room])
        self.queries += len(x)
        return torch.cat(out) if out else torch.empty(0)

    def figures(self) -> dict[str, int]:
        return {"queries": self.queries, "watermarked": self.watermarked}

    def log(self) -> dict[str, torch.Tensor] | None:
        """The watermarked queries and the answers given to them (None when there are none)."""
        if not self._log_answers:
            return None
        return {"x": torch.cat(self._log_x), "answers": torch.cat(self._log_answers)}
