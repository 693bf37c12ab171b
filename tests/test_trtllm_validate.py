"""Validation of TensorRT-LLM engine folders (shard/trtllm/validate.py, discovery.py, limits.py,
mapping.read_special_ids) on config.json fixtures in the real formats. The version checks read the
version the TEST DOUBLE of tensorrt_llm reports (tests/trtllm_double); no real TensorRT-LLM runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shard.dist import DistContext
from shard.engine.base import EngineConfigError
from shard.trtllm.discovery import find_engine_dir
from shard.trtllm.limits import EngineLimits, check_caps
from shard.trtllm.mapping import SpecialIds, read_special_ids
from shard.trtllm.startup import HostFacts, detect_host, import_trtllm
from shard.trtllm.validate import (
    check_compute_capability,
    in_supported_range,
    parse_engine_config,
    validate_engine,
    version_tuple,
)
from tests.trtllm_double.harness import FIXTURES, double_on_path, make_engine_dir


@pytest.fixture
def trtllm():
    with double_on_path() as executor:
        yield executor


@pytest.mark.parametrize(
    ("fixture", "config_dir", "limits", "layout"),
    [
        (
            "trtllm-build-0.16-llama-tp1",
            ".",
            EngineLimits(
                max_batch_size=64,
                max_input_len=2048,
                max_seq_len=4096,
                max_beam_width=1,
                max_num_tokens=8192,
                chunked_context=False,
            ),
            ("0.16.0", "bfloat16", 128256, 1, 1, 1),
        ),
        (
            "trtllm-build-1.0-llama-fp8-tp2",
            ".",
            EngineLimits(
                max_batch_size=128,
                max_input_len=8192,
                max_seq_len=16384,
                max_beam_width=1,
                max_num_tokens=16384,
                chunked_context=True,
            ),
            ("1.0.0", "bfloat16", 128256, 2, 2, 1),
        ),
        (
            "optimum-nvidia-dest",
            "NVIDIA_H100_80GB_HBM3/engines",
            # max_num_tokens null: max_batch_size x max_input_len.
            EngineLimits(
                max_batch_size=32,
                max_input_len=4096,
                max_seq_len=8192,
                max_beam_width=1,
                max_num_tokens=32 * 4096,
                chunked_context=False,
            ),
            ("0.16.0", "float16", 32768, 1, 1, 1),
        ),
    ],
)
def test_limits_and_facts_read_from_each_fixture(fixture, config_dir, limits, layout):
    engine = parse_engine_config(FIXTURES / fixture / config_dir / "config.json")
    assert engine.limits == limits
    assert (
        engine.version,
        engine.dtype,
        engine.vocab_size,
        engine.world_size,
        engine.tp_size,
        engine.pp_size,
    ) == layout


def test_limits_derived_for_info():
    no_chunking = EngineLimits(
        max_batch_size=8,
        max_input_len=4096,
        max_seq_len=8192,
        max_beam_width=1,
        max_num_tokens=2048,
        chunked_context=False,
    )
    # Without context chunking a prompt must fit one iteration (max_num_tokens).
    assert (
        no_chunking.max_input_tokens,
        no_chunking.max_total_tokens,
        no_chunking.max_batch_prefill_tokens,
    ) == (
        2048,
        8192,
        2048,
    )
    chunking = EngineLimits(
        max_batch_size=8,
        max_input_len=4096,
        max_seq_len=8192,
        max_beam_width=1,
        max_num_tokens=2048,
        chunked_context=True,
    )
    assert chunking.max_input_tokens == 4096


def test_max_seq_len_null_falls_back_to_max_position_embeddings(tmp_path):
    data = json.loads((FIXTURES / "trtllm-build-0.16-llama-tp1" / "config.json").read_text())
    data["build_config"]["max_seq_len"] = None
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert parse_engine_config(tmp_path / "config.json").limits.max_seq_len == 131072


def test_legacy_builder_config_is_refused_with_a_rebuild_command():
    with pytest.raises(EngineConfigError) as e:
        parse_engine_config(FIXTURES / "legacy-builder-config" / "config.json")
    message = str(e.value)
    assert "legacy engine" in message and "builder_config" in message
    assert (
        "rebuild it" in message
        and "trtllm-build --checkpoint_dir" in message
        and "convert_checkpoint.py" in message
    )


def test_config_without_version_is_refused(tmp_path):
    data = json.loads((FIXTURES / "trtllm-build-0.16-llama-tp1" / "config.json").read_text())
    del data["version"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(EngineConfigError, match="no `version` key"):
        parse_engine_config(tmp_path / "config.json")


def test_tp_pp_mismatch_names_num_shard(tmp_path):
    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-1.0-llama-fp8-tp2")
    with pytest.raises(EngineConfigError) as e:
        validate_engine(engine_dir, installed_version="1.0.0", world_size=1, device_cc=None, gpu_name=None)
    assert "tp_size 2 x pp_size 1 = 2 rank(s)" in str(e.value)
    assert "the shard world has 1" in str(e.value) and "--num-shard 2" in str(e.value)


def test_missing_rank_engine_is_refused(tmp_path):
    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-1.0-llama-fp8-tp2", ranks=[0])
    with pytest.raises(EngineConfigError) as e:
        validate_engine(engine_dir, installed_version="1.0.0", world_size=2, device_cc=None, gpu_name=None)
    assert "missing rank1.engine" in str(e.value)
    full = make_engine_dir(tmp_path / "f", "trtllm-build-1.0-llama-fp8-tp2")
    assert (
        validate_engine(full, installed_version="1.0.0", world_size=2, device_cc=None, gpu_name=None).tp_size
        == 2
    )


def test_compute_capability_against_the_engine_quantization():
    fp8 = parse_engine_config(FIXTURES / "trtllm-build-1.0-llama-fp8-tp2" / "config.json")
    assert fp8.min_compute_capability == (8, 9)
    with pytest.raises(EngineConfigError) as e:
        check_compute_capability(fp8, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert (
        "needs compute capability 8.9+" in str(e.value) and "A100" in str(e.value) and "8.0" in str(e.value)
    )
    check_compute_capability(fp8, (9, 0), "NVIDIA H100 80GB HBM3")  # Hopper runs FP8
    check_compute_capability(fp8, None, None)  # no GPU visible: TensorRT decides at load
    bf16 = parse_engine_config(FIXTURES / "trtllm-build-0.16-llama-tp1" / "config.json")
    with pytest.raises(EngineConfigError, match="bfloat16"):
        check_compute_capability(bf16, (7, 5), "Tesla T4")
    fp16 = parse_engine_config(
        FIXTURES / "optimum-nvidia-dest" / "NVIDIA_H100_80GB_HBM3" / "engines" / "config.json"
    )
    assert fp16.min_compute_capability is None


def test_optimum_nvidia_layout_is_found_from_dest(tmp_path):
    dest = make_engine_dir(
        tmp_path / "dest", "optimum-nvidia-dest", engines_subdir="NVIDIA_H100_80GB_HBM3/engines"
    )
    location = find_engine_dir(str(dest), gpu_name="NVIDIA H100 80GB HBM3")
    assert location.layout == "optimum-nvidia"
    assert location.engine_dir == dest / "NVIDIA_H100_80GB_HBM3" / "engines"
    assert location.gpu_folder == "NVIDIA_H100_80GB_HBM3"
    # The Hugging Face files sit at <dest>: the EOS id comes from there.
    assert read_special_ids(location) == SpecialIds(end_id=2, pad_id=2, eos_ids=(2,))
    engine = validate_engine(
        location.engine_dir, installed_version="0.16.0", world_size=1, device_cc=(9, 0), gpu_name=None
    )
    assert engine.limits.max_input_tokens == 4096


def test_optimum_nvidia_with_several_gpus_picks_this_one(tmp_path):
    dest = make_engine_dir(
        tmp_path / "dest", "optimum-nvidia-dest", engines_subdir="NVIDIA_H100_80GB_HBM3/engines"
    )
    other = dest / "NVIDIA_A100-SXM4-80GB" / "engines"
    other.mkdir(parents=True)
    (other / "config.json").write_text(
        (dest / "NVIDIA_H100_80GB_HBM3" / "engines" / "config.json").read_text()
    )
    assert find_engine_dir(str(dest), gpu_name="NVIDIA A100-SXM4-80GB").engine_dir == other
    with pytest.raises(EngineConfigError) as e:
        find_engine_dir(str(dest), gpu_name="NVIDIA L40S")
    assert "NVIDIA_A100-SXM4-80GB, NVIDIA_H100_80GB_HBM3" in str(e.value) and "NVIDIA L40S" in str(e.value)


def test_trtllm_build_layout_and_generation_config(tmp_path):
    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-0.16-llama-tp1")
    location = find_engine_dir(str(engine_dir))
    assert (location.layout, location.engine_dir) == ("trtllm-build", engine_dir)
    # eos_token_id is a list: the first is end_id, all are EOS ids; no pad id -> end_id.
    assert read_special_ids(location) == SpecialIds(
        end_id=128001, pad_id=128001, eos_ids=(128001, 128008, 128009)
    )


def test_special_ids_from_tokenizer_folder_or_refused(tmp_path):
    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-0.16-llama-tp1")
    (engine_dir / "generation_config.json").unlink()
    location = find_engine_dir(str(engine_dir))
    with pytest.raises(EngineConfigError, match="--tokenizer-name"):
        read_special_ids(location)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 7, "pad_token_id": 9}))
    assert read_special_ids(location, str(hf)) == SpecialIds(end_id=7, pad_id=9, eos_ids=(7,))


def test_hugging_face_checkpoint_or_missing_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(EngineConfigError, match="Hugging Face checkpoint, not a TensorRT-LLM engine"):
        find_engine_dir(str(tmp_path))
    with pytest.raises(EngineConfigError, match="no such folder"):
        find_engine_dir(str(tmp_path / "nope"))
    (tmp_path / "config.json").unlink()
    with pytest.raises(EngineConfigError, match="no TensorRT-LLM engine under"):
        find_engine_dir(str(tmp_path))


def test_version_parsing_and_range():
    assert version_tuple("1.2.0rc6.post2") == (1, 2)
    assert version_tuple("0.16.0") == (0, 16)
    assert version_tuple("garbage") is None
    assert [in_supported_range(v) for v in ("0.15.0", "0.16.0", "0.21.0", "1.0.0", "1.2.0rc1", "1.3.0")] == [
        False,
        True,
        True,
        True,
        True,
        False,
    ]


def test_installed_version_reported_by_the_double_is_checked(tmp_path, trtllm):
    import tensorrt_llm

    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-0.16-llama-tp1")

    def check() -> None:
        module, version = import_trtllm()
        assert module is trtllm
        validate_engine(engine_dir, installed_version=version, world_size=1, device_cc=None, gpu_name=None)

    tensorrt_llm.__version__ = "0.16.0"
    check()
    tensorrt_llm.__version__ = "0.15.0"
    with pytest.raises(
        EngineConfigError, match="installed TensorRT-LLM 0.15.0 is outside the supported 0.16 to 1.2"
    ):
        check()
    tensorrt_llm.__version__ = "1.3.0rc1"
    with pytest.raises(EngineConfigError, match="outside the supported"):
        check()
    tensorrt_llm.__version__ = "1.0.0"  # in range, but not the version that built the engine
    with pytest.raises(EngineConfigError) as e:
        check()
    assert "built by TensorRT-LLM 0.16.0 but 1.0.0 is installed" in str(e.value) and "rebuild" in str(e.value)


def test_engine_built_by_an_unsupported_version_is_refused(tmp_path):
    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-0.16-llama-tp1", version="0.12.0")
    with pytest.raises(
        EngineConfigError, match="built by TensorRT-LLM 0.12.0, outside the supported 0.16 to 1.2"
    ):
        validate_engine(engine_dir, installed_version="0.16.0", world_size=1, device_cc=None, gpu_name=None)


def test_missing_tensorrt_llm_is_refused_with_advice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes `import tensorrt_llm` fail
    host = detect_host(DistContext.single("cpu").device)
    assert host == HostFacts(trtllm=None, trtllm_version=None, compute_capability=None, gpu_name=None)
    engine_dir = make_engine_dir(tmp_path / "e", "trtllm-build-0.16-llama-tp1")
    with pytest.raises(EngineConfigError) as e:
        validate_engine(
            engine_dir, installed_version=host.trtllm_version, world_size=1, device_cc=None, gpu_name=None
        )
    assert "TensorRT-LLM is not installed" in str(e.value)
    assert "Dockerfile_trtllm" in str(e.value) and "--engine native" in str(e.value)


def test_launcher_caps_may_only_lower_the_engine_limits():
    limits = parse_engine_config(FIXTURES / "trtllm-build-0.16-llama-tp1" / "config.json").limits
    check_caps(limits, max_batch_size=16, max_input_tokens=1024, max_total_tokens=2048)
    check_caps(limits, max_batch_size=0, max_input_tokens=0, max_total_tokens=0)
    with pytest.raises(EngineConfigError) as e:
        check_caps(limits, max_batch_size=0, max_input_tokens=4096, max_total_tokens=0)
    assert "--max-input-tokens 4096 exceeds the engine's limit 2048" in str(
        e.value
    ) and "--max_input_len" in str(e.value)
    with pytest.raises(EngineConfigError, match="--max-batch-size 65 exceeds the engine's limit 64"):
        check_caps(limits, max_batch_size=65, max_input_tokens=0, max_total_tokens=0)


def test_fixture_folder_is_unchanged_by_tests():
    # make_engine_dir copies; the fixtures never hold engine files.
    assert not list(Path(FIXTURES).rglob("*.engine"))
