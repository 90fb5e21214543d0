"""The judge interface: a prompt and several responses in, one score per response out (higher is
better). The online loop only calls `judge.score(messages, responses)` and keeps the best and worst
response, so any scorer fits behind it: the simplest, a rule (a Python function), is here; reward
models and PairRM are in lion_min/run/judges.py."""

import math
from typing import Callable, Optional, Protocol, runtime_checkable

Messages = list[dict]


@runtime_checkable
class Judge(Protocol):
    def score(self, prompt: Messages, responses: list[str]) -> list[float]:
        """prompt: the conversation so far ([{"role", "content"}, ...], ending with a user turn);
        responses: candidate assistant replies (text). Returns one float per response."""
        ...


RuleFn = Callable[[Messages, str], float]

RULES: dict[str, RuleFn] = {
    # Debug judges with an obvious optimum: online DPO should make replies longer / shorter.
    "length": lambda prompt, response: float(len(response)),
    "brevity": lambda prompt, response: -float(len(response)),
}


def register_rule(name: str):
    """Decorator adding a rule to RULES under `name`, so make_judge(name) finds it."""

    def add(fn: RuleFn) -> RuleFn:
        if name in RULES and RULES[name] is not fn:
            raise ValueError(f"a rule named {name!r} is already registered")
        RULES[name] = fn
        return fn

    return add


class RuleJudge:
    def __init__(self, fn: RuleFn, name: Optional[str] = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "rule")

    def score(self, prompt: Messages, responses: list[str]) -> list[float]:
        scores = []
        for response in responses:
            value = self.fn(prompt, response)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"rule {self.name!r} returned {value!r}, not a number") from None
            # A NaN would silently break the best/worst choice of the online loop.
            if not math.isfinite(value):
                raise ValueError(f"rule {self.name!r} returned {value} for response {response[:80]!r}")
            scores.append(value)
        return scores
