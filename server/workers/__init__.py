"""`omni2 serve --workers N`: one engine process, N gateway processes on one port.

supervisor.py starts and restarts the processes; engine_service.py serves the Engine in its
process; remote_engine.py is the gateways' proxy of it; wire.py is what crosses (ZeroMQ +
msgpack). The processes' entry points are in processes.py. See server/README.md, "Process model".
"""
