"""Developer tools behind `omni2 bench`, `omni2 make-tiny`, `omni2 generate`: benchmarks,
the synthetic checkpoint, offline generation, test speech (espeak)."""
