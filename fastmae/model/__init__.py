"""The MAE model (official names), its layers, position embeddings and checkpoint I/O."""
from .checkpoint import (CheckpointError, LoadReport, atomic_save, export_encoder, load_checkpoint,
                         read_checkpoint, save_encoder)
from .layers import Attention, Block, Mlp, PatchEmbed
from .mae import (MODELS, MaskedAutoencoderViT, create_model, mae_vit_base_patch16, mae_vit_base_patch16_dec512d8b,
                  mae_vit_cifar_medium_patch4, mae_vit_cifar_small_patch4, mae_vit_huge_patch14,
                  mae_vit_huge_patch14_dec512d8b, mae_vit_large_patch16, mae_vit_large_patch16_dec512d8b,
                  mae_vit_tiny_patch4)
from .pos_embed import resize_pos_embed, sincos_2d
