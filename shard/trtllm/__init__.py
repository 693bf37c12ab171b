"""TensorRT-LLM engine adapter: serves prebuilt engine folders (trtllm-build or optimum-nvidia output)
through tensorrt_llm.bindings.executor, TensorRT-LLM 0.16 to 1.2. Entry point: engine.TrtllmEngine.

Run only against the test double in tests/trtllm_double, never against a real TensorRT-LLM (it cannot
be installed where this project was built). See docs/trtllm.md.
"""
