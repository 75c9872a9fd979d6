"""A stand-in for the parts of vllm-project/afd-plugin a connector is built on (its base class, metadata, config).

Only what stepmesh.integrations.vllm and its test touch, with the plugin's
names and signatures; nothing of vLLM.
"""
