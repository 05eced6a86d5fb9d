"""The CNS co-trainer (paper section 3.2): data from cache stores, 2D/3D networks, Eq. 5-7, evaluation.

Training never imports open_clip or segment-anything: text embeddings come from ``clip/text_embed`` and
SAM features from ``sam/feat``. ``train.commands`` holds the ``cns-cli train`` / ``cns-cli eval`` commands.
"""
