"""fastmae: Masked Autoencoders for PyTorch with fused kernels, drop-in for the official MAE.

    import fastmae
    model = fastmae.mae_vit_base_patch16(norm_pix_loss=True)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
"""
__version__ = "0.1.0"

from . import ops
from .model import (MODELS, CheckpointError, MaskedAutoencoderViT, create_model, export_encoder, load_checkpoint,
                    mae_vit_base_patch16, mae_vit_base_patch16_dec512d8b, mae_vit_cifar_medium_patch4,
                    mae_vit_cifar_small_patch4, mae_vit_huge_patch14, mae_vit_huge_patch14_dec512d8b,
                    mae_vit_large_patch16, mae_vit_large_patch16_dec512d8b, mae_vit_tiny_patch4, save_encoder)
from .ops import BackendUnavailable, use_backend
