"""The CPU fast path: kernels, weight layouts, thread and allocation policy. Only a CPU
deployment uses it; a GPU one runs the model as model/ writes it."""
