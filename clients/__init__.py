"""omni2.clients."""
