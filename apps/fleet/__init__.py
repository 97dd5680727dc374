"""Fleet reliability: MTBF, failure forecasts, job interruption and spares (`gpuwatch fleet`, docs/fleet.md)."""
