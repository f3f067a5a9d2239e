"""Pretraining, data, checkpoints and evaluation: the drop-in for the official MAE scripts.

    fastmae pretrain ...      fastmae.train.pretrain   (main_pretrain.py's flags; `train(args)` from Python)
    fastmae visualize ...     fastmae.train.visualize  (reconstruction grids)
    fastmae linprobe ...      fastmae.train.linprobe   (`linear_probe(model, train_data, val_data)`)

Modules: `data` (image folders, the official augmentation without torchvision, loaders), `synthetic` (the
built-in labelled dataset), `optim` (weight-decay groups, lr rule and schedule), `engine` (one epoch),
`checkpoint` (training checkpoints and resume), `distributed` (torchrun / DDP), `logs` (progress, JSON
lines, TensorBoard, loss curve). Nothing is imported here, so `import fastmae` stays light.
"""
