"""Supervised fine-tuning on chat conversations, packed without cross-contamination.

Features, with references:

- conversations (lists of ``{"role", "content"}`` messages) become token ids through the
  model's own chat template, with a loss mask on assistant tokens only: each assistant turn's
  content and its end-of-turn token, never the prompt, the template's markers or a system
  message (Llama 2, arXiv:2307.09288 §3.1: "we zero-out the loss on tokens from the user
  prompt"; Ouyang et al. 2022). The template is rendered turn by turn and every piece
  tokenized alone, so the ids are what generation sees: the prompt as rendered with the
  generation prompt, then the answer;
- sequence packing: conversations are grouped first-fit into packs of at most ``max_len``
  tokens (an "example" of the training loop, like a packed row), and a pack runs flat: every
  linear layer sees its real tokens only, attention is gathered per document
  (``DocumentAttention``: each document attends causally to itself and nothing else) and RoPE
  positions restart at 0 in every document. That is the block-diagonal causal mask of packed
  training (Krell et al. 2021, arXiv:2107.02027; Ding et al. 2024, arXiv:2404.10830) without
  building it: the (T, T) mask of a 2048-token row would cost T² scores per head and layer
  where the documents' own blocks cost Σ L_d². A packed document's loss equals its loss run
  alone (tests);
- ``sft_loss_fn`` / ``sft_units`` for ``models.train.train`` (per-token mean over the global
  batch: every assistant token weighs the same, however conversations are packed), and
  ``train_sft``; ``load_conversations_jsonl`` for ``{"messages": [...]}`` lines (the format of
  TRL's conversational datasets and OpenAI's fine-tuning files) and TRL's prompt-completion
  rows, flat or conversational.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.afm import AFM
from models.chat import checked_messages, response_text, split_conversation
from models.posttrain import PostTrainResult, Progress, recorder, run_flat
from models.tokenizer import TextTokenizer
from models.train import TrainConfig, train

# (token ids, loss mask): one encoded conversation
Document = tuple[list[int], list[bool]]


# ------------------------------------------------------------------------------ data
def encode_conversation(
    tokenizer: TextTokenizer, messages: Sequence[dict], max_len: int | None = None
) -> Document:
    """(ids, mask) of one conversation in ``tokenizer``'s chat template; mask True on
    assistant tokens up to and including each turn's last EOS (the template's newline after
    it is not trained), except on assistant messages with ``"weight": 0`` (OpenAI's
    fine-tuning format: context the model reads but is not taught). Keeps the first
    ``max_len`` tokens. ValueError if the template does not render a conversation as the
    concatenation of its turns (each rendering a prefix of the next), since then no token
    belongs to one turn."""
    if not tokenizer.chat_template:
        raise ValueError("SFT needs a tokenizer with a chat template")
    trained_turns = [m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages]
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i in range(len(messages)):
        if not trained_turns[i]:
            continue
        head = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise ValueError(f"turn {i}: the chat template does not render turns as prefixes")
        pieces += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    if not any(trained for _, trained in pieces):
        raise ValueError("a conversation needs at least one assistant message to train on")
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces.append((rest[len(done) :], False))
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in pieces:
        piece = tokenizer.encode(text) if text else []
        keep = len(piece)
        if trained and tokenizer.eos_token_id in piece:  # up to the turn's last EOS
            keep = len(piece) - piece[::-1].index(tokenizer.eos_token_id)
        ids += piece
        mask += [trained and j < keep for j in range(len(piece))]
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    mask[0] = False  # the first token has no prefix to be predicted from
    return ids, mask


def pack_documents(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Document indices grouped first-fit, in order, into packs of at most ``max_len`` tokens
    (a longer document is a pack of its own). Deterministic: the same lengths, the same packs."""
    packs: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        slot = next((j for j, r in enumerate(room) if r >= n), None)
        if slot is None:
            packs.append([i])
            room.append(max_len - n)
        else:
            packs[slot].append(i)
            room[slot] -= n
    return packs


def load_conversations_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    """Conversations from JSONL lines ``{"messages": [{"role", "content"}, ...]}``, or TRL's
    prompt-completion rows ``{"prompt", "completion"}``, flat (text) or conversational (the
    prompt a message list ending with the user turn, the completion an assistant message list:
    the grading export's single-sided conversational rows). Other keys are ignored; a
    malformed line raises ValueError starting with ``path:line:``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_messages(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{number}: {e}") from e
    return out


def demonstration(context: Sequence[dict], prompt: str, completion: str) -> list[dict]:
    """A prompt-completion pair as a conversation that trains the completion only: the
    assistant turns of ``context`` get weight 0 (TRL trains only the completion of such
    rows)."""
    earlier = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in context]
    user = {"role": "user", "content": prompt}
    return [*earlier, user, {"role": "assistant", "content": completion}]


def _messages(row: dict) -> list[dict]:
    if "messages" not in row and {"prompt", "completion"} <= set(row):
        context, prompt = split_conversation(row["prompt"])
        return demonstration(context, prompt, response_text(row["completion"], "completion"))
    if "messages" not in row:
        raise ValueError("each line needs 'messages', or 'prompt' and 'completion'")
    messages = checked_messages(row["messages"])
    for m, given in zip(messages, row["messages"], strict=True):
        if "weight" in given:
            if given["weight"] not in (0, 1) or isinstance(given["weight"], bool):
                raise ValueError(f"a message's weight must be 0 or 1, not {given['weight']!r}")
            m["weight"] = given["weight"]
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise ValueError("no assistant message to train on")
    return messages


# ------------------------------------------------------------------------------ layout
class DocumentAttention:
    """Attention over flat packed documents: q (N, H, hd), k and v (N, Hkv, hd); ``index``
    (D, L) holds each document's flat token indices (padding points at token 0), ``scatter``
    (N,) each token's slot in the (D·L) output. One causal SDPA over the D documents: a
    real query never sees padding (it lies after the document's end) or another document."""

    def __init__(self, index: torch.Tensor, scatter: torch.Tensor):
        self.index, self.scatter = index, scatter

    def __call__(self, q, k, v, layer: int) -> torch.Tensor:
        D, L = self.index.shape
        H, hd = q.shape[1:]

        def gather(x):  # (N, heads, hd) -> (D, heads, L, hd)
            return x.index_select(0, self.index.flatten()).unflatten(0, (D, L)).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            gather(q), gather(k), gather(v), is_causal=True, enable_gqa=H != k.shape[1]
        )  # (D, H, L, hd)
        return y.transpose(1, 2).reshape(D * L, H * hd).index_select(0, self.scatter)


@dataclass(frozen=True)
class PackedDocuments:
    """Documents laid flat (see ``DocumentAttention``), with the loss positions."""

    tokens: torch.Tensor  # (N,) token ids, documents one after another
    positions: torch.Tensor  # (N,) RoPE positions, restarting at 0 in every document
    index: torch.Tensor  # (D, L) flat index of each document's tokens; padding -> 0
    scatter: torch.Tensor  # (N,) each token's slot in the (D·L) attention output
    target: torch.Tensor  # (M,) flat index of each trained token (its predictor is one before)
    doc: torch.Tensor  # (M,) the document of each trained token

    @classmethod
    def build(cls, docs: Sequence[Document]) -> PackedDocuments:
        lengths = torch.tensor([len(ids) for ids, _ in docs])  # (D,)
        L = int(lengths.max())
        real = torch.arange(L) < lengths[:, None]  # (D, L)
        flat = (real.flatten().cumsum(0) - 1).masked_fill_(~real.flatten(), 0)
        mask = torch.tensor([m for _, ms in docs for m in ms], dtype=torch.bool)  # (N,)
        doc_of = torch.arange(len(docs)).repeat_interleave(lengths)  # (N,)
        return cls(
            torch.tensor([t for ids, _ in docs for t in ids]),
            torch.arange(L).expand(len(docs), L)[real],
            flat.view(len(docs), L),
            real.flatten().nonzero()[:, 0],
            mask.nonzero()[:, 0],
            doc_of[mask],
        )


def document_logprobs(model: AFM, docs: Sequence[Document]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each document's trained tokens (D,), their count (D,)), differentiable;
    the documents run packed flat, each seeing only itself."""
    packed = PackedDocuments.build(docs)
    device = model.device
    index, scatter = packed.index.to(device), packed.scatter.to(device)
    tokens, positions = packed.tokens.to(device), packed.positions.to(device)
    h = run_flat(model, tokens, positions, DocumentAttention(index, scatter))  # (N, dim)
    target = packed.target.to(device)
    logits = model.head(h[target - 1]).float()  # (M, vocab): hidden t-1 predicts token t
    token_lp = -F.cross_entropy(logits, tokens[target], reduction="none")  # (M,)
    sums = torch.zeros(len(docs), device=device).index_add(0, packed.doc.to(device), token_lp)
    counts = torch.tensor([sum(m) for _, m in docs], device=device)
    return sums, counts


# ------------------------------------------------------------------------------ training
def sft_loss_fn(model: AFM, examples: Sequence[Sequence[Document]]):
    """``loss_fn(indices)`` for ``models.train.train`` over ``examples`` (packs of documents):
    the mean negative log-likelihood per trained token of those packs. Pass ``sft_units`` as
    ``units`` so micro-batches and processes weigh by tokens."""

    def loss_fn(indices: torch.Tensor) -> torch.Tensor:
        docs = [d for i in indices.tolist() for d in examples[i]]
        sums, counts = document_logprobs(model, docs)
        return -sums.sum() / counts.sum().clamp(min=1)

    return loss_fn


def sft_units(examples: Sequence[Sequence[Document]]):
    """``units(indices)``: the trained tokens in those packs."""
    tokens = torch.tensor([sum(sum(m) for _, m in pack) for pack in examples], dtype=torch.float)

    def units(indices: torch.Tensor) -> float:
        return float(tokens[indices].sum())

    return units


def train_sft(
    model: AFM,
    conversations: Sequence[Sequence[dict]],
    tokenizer: TextTokenizer,
    config: TrainConfig,
    progress: Progress | None = None,
    *,
    max_len: int = 2048,
    pack: bool = True,
    resume_from: str | os.PathLike | None = None,
) -> PostTrainResult:
    """Fine-tune ``model`` (its parameters that require grad: all, or LoRA's) on the assistant
    turns of ``conversations``. Each conversation keeps its first ``max_len`` tokens; with
    ``pack`` they are grouped into packs of ``max_len`` tokens and ``config.batch_size``
    counts packs, else conversations. Returns the final state and every step's metrics."""
    docs = [encode_conversation(tokenizer, c, max_len) for c in conversations]
    docs = [d for d in docs if any(d[1])]  # truncation can cut every assistant token
    if not docs:
        raise ValueError("no conversation has an assistant token to train on")
    groups = pack_documents([len(ids) for ids, _ in docs], max_len) if pack else None
    examples = [[docs[i] for i in g] for g in groups] if groups else [[d] for d in docs]
    history: list[dict[str, float]] = []
    state = train(
        model,
        sft_loss_fn(model, examples),
        len(examples),
        config,
        units=sft_units(examples),
        progress=recorder(history, progress),
        resume_from=resume_from,
    )
    return PostTrainResult(state, history)
