"""The compiler core: model -> twin GraphModule that computes logits and SRD maps.

    options.py    the validated options object (``Options``) shared by compile, Explainer and the CLI
    trace.py      torch.fx tracing (timm's no-trace lists, rule leaves), in-place functionalisation
    analysis.py   activation layers, gates, the encoder output L, affine blocks, position/channel axes
    twin.py       the twin builder: forward with recorded constants, head, one SRD backward per block
    codegen.py    names, the one ``srd.*`` runtime namespace and block comments of the generated code
    heads.py      the initial relevance at L (Eq. 4)
    runtime.py    the small tensor functions the generated code calls
    tokens.py     read-out of token layers: patch grid and prefix tokens (``token_grid``)
    explainer.py  the pipeline in one place: ``compile`` and ``Explainer``

This package imports nothing at import time, so that the rules (``srd_fx.rules``) can use the
runtime without an import cycle.
"""
