"""A reference reproduction of Hinton et al. (2012), "Improving neural networks by preventing
co-adaptation of feature detectors": the MNIST result, in PyTorch."""

__version__ = "0.1.0"
