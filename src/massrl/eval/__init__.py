"""Offline evaluation and export of pre-trained backbones.

checkpoint (load: a checkpoint's backbone and run config), knn (weighted_knn, a pure tensor
function shared with the online monitor), features (cached frozen features), linear (linear
evaluation / fine-tuning), umap_plot (save_umap), export (export_backbone); session holds what
the CLI commands share.
"""
