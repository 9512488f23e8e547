"""The compiler core: model -> twin GraphModule that computes logits and SRD maps.

    trace.py      torch.fx tracing (timm's no-trace lists, rule leaves), in-place functionalisation
    analysis.py   activation layers, gates, the encoder output L, affine blocks, channel axes
    twin.py       the twin builder: forward with recorded constants, head, one SRD backward per block
    heads.py      the initial relevance at L (Eq. 4)
    runtime.py    the small tensor functions the generated code calls
    explainer.py  the pipeline in one place: ``compile`` and ``Explainer``

This package imports nothing at import time, so that the rules (``srd_fx.rules``) can use the
runtime without an import cycle.
"""
