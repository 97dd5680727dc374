"""Node agent: the NVML sampler, XID events, the spool, the publisher and the command listener: what runs on a GPU node."""
