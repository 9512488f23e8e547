"""The evaluation harness (needs the ``[eval]`` extra: scikit-learn, scikit-image, matplotlib, Pillow):
data (digit scenes, image folders), models, training, baselines (captum, zennit, pytorch-grad-cam),
Quantus metrics, the evaluation loop, image/model I/O, and data-parallel runs under torchrun
(``distributed``: process group, shares of the work, atomic outputs, resume records)."""
