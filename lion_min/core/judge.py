"""The judge interface: a prompt and several responses in, one score per response out (higher is
better). The online loop only calls `judge.score(messages, responses)` and keeps the best and worst
response, so any scorer fits behind it (lion_min/run/judges.py: rules, reward models, PairRM)."""

from typing import Protocol, runtime_checkable

Messages = list[dict]


@runtime_checkable
class Judge(Protocol):
    def score(self, prompt: Messages, responses: list[str]) -> list[float]:
        """prompt: the conversation so far ([{"role", "content"}, ...], ending with a user turn);
        responses: candidate assistant replies (text). Returns one float per response."""
        ...
