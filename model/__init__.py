"""omni2.model."""
