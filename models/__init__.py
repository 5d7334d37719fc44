"""EvalHub's model library: plain PyTorch, no Django.

- ``models.afm``: the AFM decoder (also loads Llama-family checkpoints such as SmolLM2).
- ``models.generate``: batched generation and continuation log-likelihoods.
- ``models.checkpoint``: import GGUF / Hugging Face checkpoints; load ours.
- ``models.tokenizer``: the checkpoint's tokenizer; SentencePiece training.
- ``models.backends``: one ``Backend`` protocol over our engine, transformers and HTTP servers.
- ``models.preferences``: the preference levels and ``Preference`` records; no torch, no Django.

Submodules are imported explicitly; this package imports nothing heavy (torch, transformers)
so that ``import models`` stays cheap for code that only needs, say, the HTTP backend.
"""
