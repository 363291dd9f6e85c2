"""Safetensors files without torch: the strict header reader, checkpoint sets, the one writer, input files.

Every read of a safetensors *header* and every write of a safetensors file in
slotsmith goes through here. The torch side loads tensor *data* with the
safetensors library itself (the cache's latent files in ``data/cache.py``, a
base's weights in ``training/wan.py``), after its header was validated here,
or as the bytes ``header.read_tensor_bytes`` reads (a slot's tensors,
musubi-tuner's cache files in ``data/musubi.py``).
"""
