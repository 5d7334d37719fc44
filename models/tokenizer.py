"""Tokenizers: the checkpoint's own (a Hugging Face fast tokenizer) and SentencePiece BPE for
training new AFM models.

``Tokenizer`` wraps whatever ``tokenizer.json`` a checkpoint carries (imported from a GGUF file
or a Hugging Face directory by ``models.checkpoint``), so text is split exactly as the model
was trained. ``train_sentencepiece`` builds a new vocabulary the way the AFM paper describes
(BPE, digits split into single tokens, byte fallback so no input is out of vocabulary), and
``SentencePieceTokenizer`` reads it back behind the same interface.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TextTokenizer(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True
    ) -> str: ...

    @property
    def chat_template(self) -> str | None: ...


class Tokenizer:
    """A checkpoint's Hugging Face fast tokenizer behind a small, stable interface.

    ``add_special_tokens`` defaults to False: prompts are usually already chat-formatted
    (the template writes the special tokens), and lm-eval scores raw text the same way.
    """

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id: int | None = pad if pad is not None else self.eos_token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(Path(path)))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        from transformers import AutoTokenizer

        path = Path(path)
        return cls(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def chat_template(self) -> str | None:
        return self._tok.chat_template

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = False
    ) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True
    ) -> str:
        if not self._tok.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return self._tok.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def save(self, out_dir: str | os.PathLike) -> None:
        self._tok.save_pretrained(Path(out_dir))


class SentencePieceTokenizer:
    """A SentencePiece model (from ``train_sentencepiece``) with the ``Tokenizer`` interface."""

    def __init__(self, model_file: str | os.PathLike, chat_template: str | None = CHATML_TEMPLATE):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.chat_template = chat_template
        # A chat model ends its turn with <|im_end|>; stop there rather than at </s>.
        end_of_turn = self._sp.piece_to_id("<|im_end|>")
        self.eos_token_id: int | None = (
            end_of_turn if end_of_turn != self._sp.unk_id() else self._sp.eos_id()
        )
        self.bos_token_id: int | None = self._sp.bos_id()
        pad = self._sp.pad_id()
        self.pad_token_id: int | None = pad if pad >= 0 else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [self._sp.bos_id(), *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if not self._sp.is_control(i)]
        return self._sp.decode(list(ids))

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2

        template = jinja2.Environment(keep_trailing_newline=True).from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | SentencePieceTokenizer:
    """The tokenizer stored in a checkpoint directory: tokenizer.json (Hugging Face) first,
    else tokenizer.model (SentencePiece, with chat_template.jinja if present)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    if (path / "tokenizer.model").is_file():
        template = path / "chat_template.jinja"
        return SentencePieceTokenizer(
            path / "tokenizer.model", template.read_text() if template.is_file() else None
        )
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")


def train_sentencepiece(
    corpus_path: str | os.PathLike,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    num_threads: int = 2,
) -> Path:
    """Train a SentencePiece BPE tokenizer on a text file (one document or sentence a line).

    Writes ``tokenizer.model``, ``tokenizer.vocab`` and a ChatML ``chat_template.jinja`` into
    out_dir and returns the model path. Settings follow the Llama/AFM recipe: BPE, every digit a
    token of its own (arithmetic sees aligned digits), byte fallback (any UTF-8 round-trips
    instead of mapping to <unk>), no text normalisation (what goes in comes out). The vocabulary
    must leave room for the 256 byte tokens and the specials.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|im_start|>", "<|im_end|>"]
    if vocab_size < 256 + 4 + len(specials) + 10:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond byte and special tokens")
    spm.SentencePieceTrainer.train(
        input=str(corpus_path),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,  # rare characters go to bytes rather than the vocabulary
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,  # "Paris" and " Paris" stay distinct, as in byte-level BPE
        user_defined_symbols=specials,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=num_threads,
        minloglevel=2,  # keep training quiet
    )
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return out / "tokenizer.model"
