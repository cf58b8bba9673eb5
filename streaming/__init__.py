"""omni2.streaming."""
