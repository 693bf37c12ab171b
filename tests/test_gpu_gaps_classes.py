"""gpu_gaps' classes of work (the booking itself needs CUDA events: tests/test_gpu_engine.py)."""

from shard.native.gpu_gaps import work_class


def test_decode_steps_are_classed_by_batch_size_and_prefills_apart() -> None:
    assert work_class("prefill", 9000) == "prefill"
    got = {rows: work_class("step", rows) for rows in (1, 8, 9, 32, 33, 64, 65, 128, 129, 256, 257, 1024)}
    assert got == {
        1: "decode<=8", 8: "decode<=8", 9: "decode<=32", 32: "decode<=32", 33: "decode<=64", 64: "decode<=64",
        65: "decode<=128", 128: "decode<=128", 129: "decode<=256", 256: "decode<=256", 257: "decode>256",
        1024: "decode>256",
    }  # fmt: skip
    assert work_class("call, rebuilt", 3) == work_class("call", 3) == "decode<=8"
