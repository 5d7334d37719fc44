"""EvalHub's model library: plain PyTorch, no Django.

- ``models.afm``: the AFM decoder (also loads Llama-family checkpoints such as SmolLM2);
  ``Block.forward`` is the block's arithmetic for every layout.
- ``models.kernels``: attention kernels per layout, training backwards, CPU inference kernels.
- ``models.linear``: the weight seam every projection goes through (dense, packed, int4, ...).
- ``models.draft``: the int4 draft for speculative decoding.
- ``models.train``: the training loop (reward models now; SFT, DPO, RL next).
- ``models.cache``: one per-process cache of loaded models with a byte budget.
- ``models.generate``: batched generation and continuation log-likelihoods.
- ``models.checkpoint``: import GGUF / Hugging Face checkpoints; load ours.
- ``models.tokenizer``: the checkpoint's tokenizer; SentencePiece training.
- ``models.backends``: one ``Backend`` protocol over our engine, transformers and HTTP servers.
- ``models.preferences``: the preference levels and ``Preference`` records; no torch, no Django.

Submodules are imported explicitly; this package imports nothing heavy (torch, transformers)
so that ``import models`` stays cheap for code that only needs, say, the HTTP backend.
``models/README.md`` draws the library and says where LoRA, palettization and post-training
plug in.
"""
