"""A prompt with the conversation before it, and how a model reads it. Plain Python: no torch,
no Django.

A *prompt* (``Prompt``) is either a string, one user message, or a list of ``{"role",
"content"}`` messages that ends with the user turn to answer, after any system message and
earlier turns. Reward models, DPO/IPO and SFT all read one through ``chat_prompt``: the
tokenizer's chat template with the generation prompt, which is how the backends format a chat
for generation (``models.backends.base.TokenBackend.chat_format``). A response is therefore
scored in the conversation it answered, not against the bare last turn. ``transcript`` is the
plain-text form for readers without a template (sentence embeddings, a tokenizer without
one). A single user message's transcript is its text.

``split_conversation`` reads TRL's conversational rows (``prompt`` as a message list) into
(context, last user turn), as ``grading`` stores an item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, str]
Prompt = str | Sequence[Mapping[str, str]]


def messages_of(prompt: Prompt) -> list[Message]:
    """The messages of a prompt: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def conversation(context: Sequence[Mapping[str, str]], prompt: str) -> list[Message]:
    """The messages before a response: the earlier ``context``, then the user's ``prompt``."""
    return [*messages_of(context), {"role": "user", "content": prompt}]


def transcript(messages: Prompt) -> str:
    """A conversation as plain text: a lone user message as it is, else one paragraph per
    message headed by its role."""
    messages = messages_of(messages)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def chat_prompt(tokenizer: TextTokenizer, prompt: Prompt) -> str:
    """The text a model reads before its answer to ``prompt``: the tokenizer's chat template
    with the generation prompt, or the ``transcript`` when the tokenizer has no template."""
    messages = messages_of(prompt)
    if getattr(tokenizer, "chat_template", None):  # test tokenizers may not define it
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return transcript(messages)


def checked_messages(value: object, name: str = "messages") -> list[Message]:
    """``value`` as a non-empty message list, or ValueError naming ``name`` and the message."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"{name}[{i}] needs a role in {ROLES} and string content: {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def split_conversation(value: object, name: str = "prompt") -> tuple[list[Message], str]:
    """(context, last user turn) of a prompt given as text or as a message list (TRL's
    conversational format); ValueError if the list does not end with a user message."""
    if isinstance(value, str):
        return [], value
    messages = checked_messages(value, name)
    if messages[-1]["role"] != "user":
        raise ValueError(f"{name!r} must end with the user turn, not {messages[-1]['role']!r}")
    return messages[:-1], messages[-1]["content"]


def response_text(value: object, name: str) -> str:
    """A response given as text or as TRL's assistant message list (contents joined)."""
    if isinstance(value, str):
        return value
    messages = checked_messages(value, name)
    if any(m["role"] != "assistant" for m in messages):
        raise ValueError(f"{name!r} must hold assistant messages only")
    return "\n\n".join(m["content"] for m in messages)
