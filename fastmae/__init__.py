"""fastmae: Masked Autoencoders for PyTorch with fused kernels, drop-in for the official MAE."""
__version__ = "0.1.0"
