"""The frozen diffusion teacher (model.py), its persistent feature cache (cache.py), reductions to the
shared latent dimension (reduce.py), the glue the algorithms use (features.py), and `mmfed teacher
pretrain` (pretrain.py). Never imports `algorithms` or `federation`."""
