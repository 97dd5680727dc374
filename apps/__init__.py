"""Applications built on the stages: the command line, the demo, the report, the fleet view, the benchmarks."""
