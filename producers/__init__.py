"""Node agent: NVML sampler, fleet simulator, publisher."""
