"""Microbenchmarks of every op against eager PyTorch and torch.compile; `suite` runs them all
(`python -m contrastive_kernels bench`), the per-op modules run one with finer options."""
