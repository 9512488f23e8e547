"""The evaluation harness (needs the ``[eval]`` extra: ``pip install "srd_fx[eval]"``): data (digit
scenes, image folders), models, training, baselines (captum, zennit, pytorch-grad-cam), Quantus
metrics, the evaluation loop, image/model I/O, and data-parallel runs under torchrun
(``distributed``: process group, shares of the work, atomic outputs, resume records).

Importing this package checks that the extra's libraries are installed and raises
:class:`srd_fx.errors.MissingDependencyError` naming the missing ones otherwise (the compiler,
``import srd_fx; srd_fx.compile(...)``, needs none of them).
"""
from __future__ import annotations

from ..extras import require_eval

require_eval()
