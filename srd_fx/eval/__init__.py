"""The evaluation harness (needs the ``[eval]`` extra: scikit-learn, scikit-image, matplotlib, Pillow):
data (digit scenes, image folders), models, training, baselines (captum, zennit, pytorch-grad-cam),
Quantus metrics, the evaluation loop and image/model I/O."""
