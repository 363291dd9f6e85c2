"""The torch side of ``slotsmith cache``: the dataset YAML, reading media,
the VAE and text encoders, and the training cache with its builder."""
