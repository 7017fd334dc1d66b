"""Running MoE models: generation, routing overrides at inference, experts streamed from disk."""
