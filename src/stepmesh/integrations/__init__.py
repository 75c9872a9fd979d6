"""Integrations of stepmesh into inference frameworks (vLLM afd-plugin connector)."""
