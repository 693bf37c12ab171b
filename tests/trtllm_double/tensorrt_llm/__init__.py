"""TEST DOUBLE of the `tensorrt_llm` package, NOT TensorRT-LLM. Used only by the tests, which put
tests/trtllm_double on sys.path for their duration. It follows the documented Executor API of
TensorRT-LLM 0.16-1.2 and runs no model; see README.md in the folder above."""

__version__ = "1.0.0"
IS_TEST_DOUBLE = True
