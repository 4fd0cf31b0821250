"""What both the line parser (`ingest`) and the guards (`guarding`) need to know about a line:
how its validation fails, and which provider serves a model. Kept apart so the two modules
import it rather than each other."""

from __future__ import annotations

_OPENAI_PREFIXES = (
    "gpt-",
    "o1",
    "o3",
    "o4",
    "chatgpt-",
    "text-embedding-",
    "omni-moderation",
    "text-moderation",
    "davinci-",
    "babbage-",
)


class Invalid(Exception):
    """One line's validation failure (internal; collected into `LineError`s)."""

    def __init__(self, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.field = field


def infer_provider(model: str) -> str | None:
    """The provider serving `model`, told by its name; None when the name does not say."""
    if model.startswith("claude"):
        return "anthropic"
    if model.startswith(_OPENAI_PREFIXES):
        return "openai"
    if model.startswith(("gemini-", "models/gemini-")):
        return "gemini"
    return None
