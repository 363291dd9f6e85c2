"""The only code that reads or writes safetensors files."""
