"""cramcl: multimodal continual instruction tuning with CRAM and the field's other methods."""
__version__ = "0.1.0"
