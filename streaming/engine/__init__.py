"""The inference engine: one thread owns the model, the KV cache and every slot; sessions send
it turns (messages.py) and get text and audio back (vocoder.py, frame_decoder.py).
See streaming/ENGINE_API.md."""
