"""GPU benchmarks; each writes JSON (and a plot) into docs/."""
