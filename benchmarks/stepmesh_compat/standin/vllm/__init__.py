"""A small stand-in for the parts of vLLM that StepMesh's AFD connector (tests/vllm/stepmesh_connector.py) imports.

Only what the connector touches: ``vllm.logger.init_logger``, ``vllm.config``'s
AFD, parallel and scheduler configs, and the AFD connector base class and
metadata of vLLM's AFD branch. Nothing of vLLM's engine.
"""
