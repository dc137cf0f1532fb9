"""Looking inside an image flow: coupling traces, latents, Jacobians, patch resampling and samples
(:mod:`flowcore.inspection.probes`). Builds on :mod:`flowcore.flows` only."""
