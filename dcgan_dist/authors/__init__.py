"""The authors' own DCGANs (Newmu/dcgan_code): their 32 px networks layer for layer
(networks.py: presets imagenet32, svhn32), their released .npy weights found, checked and
converted (weights.py), and `python -m dcgan_dist.authors` / `python -m dcgan_dist.import_authors`,
which registers them in MLflow (__main__.py).

Nothing loads here: models.py imports networks.py through this package without loading
weights.py (which imports models.py), and `python -m dcgan_dist.authors` imports this package
before its __main__, whose --help answers before torch loads.
"""
