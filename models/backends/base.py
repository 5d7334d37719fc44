"""The backend protocol and the text-level logic shared by backends that run token ids locally.

Nothing here imports torch: ``openai_http`` uses it without loading a model library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from models.tokenizer import TextTokenizer


class BackendError(Exception):
    """A backend could not be loaded or could not answer (after any retries)."""


@dataclass(frozen=True)
class GenerationArgs:
    max_new_tokens: int = 256  # enough for a short answer; suites set their own
    temperature: float = 0.0  # 0 means greedy decoding, reproducible across runs
    top_p: float = 1.0  # nucleus sampling mass (Holtzman et al. 2019); 1.0 disables it
    stop: tuple[str, ...] = ()  # output is cut before the first of these strings
    seed: int = 0  # sampling seed, recorded with every result
    # Stop a row whose text has fallen into a loop (``degenerate``): a small model often
    # repeats one line to the token cap, which costs minutes per prompt and scores nothing.
    # Suites set it where no honest answer repeats itself that much.
    stop_on_repetition: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid generation arguments: {self}")
        if isinstance(self.stop, str):  # a bare string would silently become its characters
            raise TypeError("stop must be a tuple of strings, not a string")

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    def generate(self, prompts: Sequence[str], args: GenerationArgs) -> list[str]:
        """One completion per prompt (prompts are already chat-formatted if need be)."""

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log-probs of continuation given context, continuation is the greedy
        output) per (context, continuation) pair, as lm-evaluation-harness defines it."""

    def chat_format(self, messages: list[dict]) -> str:
        """The prompt string for a list of {"role", "content"} messages, ready to generate."""

    def info(self) -> dict:
        """JSON-safe description of the backend (kind, model, provenance) for results."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the earliest occurrence of any stop string."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


# A loop is a block of at most LOOP_PERIOD characters repeated to fill the last
# max(LOOP_REPEATS x block, LOOP_SPAN) characters of the text.
LOOP_PERIOD, LOOP_REPEATS, LOOP_SPAN = 200, 4, 240
LOOP_EVERY = 16  # generated tokens between two loop checks of a row


def degenerate(text: str) -> bool:
    """Whether ``text`` ends in a loop: its last max(4 p, 240) characters repeat one block of
    p <= 200 characters (a line or a phrase said over and over, or one character). Two or
    three repeats, as in "repeat the request, then answer", are not a loop."""
    for p in range(1, LOOP_PERIOD + 1):
        n = max(LOOP_REPEATS * p, LOOP_SPAN)
        if n > len(text):
            break
        tail = text[-n:]
        if tail[p:] == tail[:-p]:  # periodic with period p
            return True
    return False


def stop_check(
    tok: TextTokenizer, stop: Sequence[str], repetition: bool = False
) -> Callable[[list[int]], bool] | None:
    """``new_ids -> True`` once any of ``stop`` appears in their text or, with
    ``repetition``, once the text ends in a loop (``degenerate``, checked every
    ``LOOP_EVERY`` tokens); None when there is nothing to check. A stop string that just
    appeared lies within the newest few tokens (each token decodes to at least one
    character), so only the tail is decoded every step."""
    if not stop and not repetition:
        return None
    tail = max((len(s) for s in stop), default=0) + 4
    # Tokens enough to hold the loop check's span whatever their length (one char at least).
    loop_tokens = LOOP_REPEATS * LOOP_PERIOD

    def check(new_ids: list[int]) -> bool:
        if stop and any(s in tok.decode(new_ids[-tail:], skip_special_tokens=True) for s in stop):
            return True
        if repetition and len(new_ids) % LOOP_EVERY == 0:
            return degenerate(tok.decode(new_ids[-loop_tokens:], skip_special_tokens=True))
        return False

    return check


class TokenBackend:
    """Text <-> token plumbing for backends whose model works on token ids.

    Subclasses set ``self.tokenizer`` (a ``models.tokenizer`` tokenizer) and implement
    ``_generate_ids`` and ``_loglikelihood_ids``.
    """

    tokenizer: TextTokenizer

    def _generate_ids(
        self, prompts: list[list[int]], args: GenerationArgs, should_stop
    ) -> list[list[int]]:
        raise NotImplementedError

    def _loglikelihood_ids(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def chat_format(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(
        self,
        prompts: Sequence[str],
        args: GenerationArgs,
        on_token: Callable[[], None] | None = None,
    ) -> list[str]:
        return self._generate_text(prompts, args, on_token)

    def _generate_text(
        self,
        prompts: Sequence[str],
        args: GenerationArgs,
        on_token: Callable[[], None] | None = None,
        **route,
    ) -> list[str]:
        """``generate``; ``route`` goes to ``_generate_ids`` (the builtin engine's adapters).
        ``on_token()`` is called for every token generated (progress of long generations)."""
        tok = self.tokenizer
        ids = [tok.encode(p) for p in prompts]
        check = stop_check(tok, args.stop, args.stop_on_repetition)
        should_stop = None
        if on_token is not None:

            def should_stop(row: int, new_ids: list[int]) -> bool:
                on_token()
                return check is not None and check(new_ids)

        elif check is not None:
            should_stop = lambda row, new_ids: check(new_ids)  # noqa: E731
        outputs = self._generate_ids(ids, args, should_stop, **route)
        return [cut_at_stop(tok.decode(o, skip_special_tokens=True), args.stop) for o in outputs]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self._loglikelihood_ids([self.encode_pair(c, x) for c, x in pairs])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation, the pair
        is encoded as one string, and the continuation is what follows the context's tokens.
        An empty context is scored after the end-of-text token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        tok = self.tokenizer
        if not context:
            if tok.eos_token_id is None:
                raise BackendError("an empty context needs an end-of-text token to score after")
            return [tok.eos_token_id], tok.encode(continuation)
        whole = tok.encode(context + continuation)
        ctx = tok.encode(context)
        return ctx, whole[len(ctx) :]
