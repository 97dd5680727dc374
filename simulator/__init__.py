"""The fleet simulator: synthetic NVML telemetry, injected failures and look-alikes.

Used by training, the demo, the benchmarks and the agent's --simulate backend; never by a stage's decisions.
"""
