"""omni2.server."""
