"""Request parsing, config parameters, repository rendering, and the configs agreeing with the code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vdiff.backend.inputs import LIST_OPTIONS, OPTIONS, InvalidInputError, name_inputs, parse_options, text_input
from vdiff.backend.settings import BackendSettings
from vdiff.bounds import RequestBounds
from vdiff.serve.cli import model_parameters, openai_parser, triton_parser
from vdiff.serve.repository import SOURCE, read_parameters, render_repository, set_parameters

BOUNDS = RequestBounds(max_sequence_length=512, vocab_size=390, longest_token_chars=16)


def one(value: object, dtype: object) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def test_every_option_reaches_sampling_params() -> None:
    params, stream = parse_options(
        {
            "max_tokens": one(64, np.int32),
            "temperature": one(0.5, np.float32),
            "top_p": one(0.75, np.float32),
            "top_k": one(20, np.int32),
            "seed": one(2**40, np.uint64),
            "stop_words": np.array([[b"\n", b"END"]], dtype=np.object_),
            "ignore_eos": one(True, np.bool_),
            "steps": one(32, np.int32),
            "block_length": one(16, np.int32),
            "algorithm": one(b"random", np.object_),
            "cfg_scale": one(1.5, np.float32),
            "stream": one(True, np.bool_),
            "exclude_input_in_output": one(False, np.bool_),
        },
        BOUNDS,
    )
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (64, 0.5, 0.75, 20)
    assert (params.seed, params.stop, params.ignore_eos) == (2**40, ("\n", "END"), True)
    assert (params.steps, params.block_length, params.algorithm, params.cfg_scale) == (32, 16, "random", 1.5)
    assert stream.stream and stream.echo


def test_absent_options_take_the_defaults() -> None:
    params, stream = parse_options({}, BOUNDS)
    assert params.max_tokens is None and params.temperature is None and params.stop == ()
    assert not stream.stream and not stream.echo


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"max_tokens": np.array([[1, 2]], dtype=np.int32)}, "input 'max_tokens' must hold exactly one value, got 2"),
        ({"temperature": one(np.inf, np.float32)}, "input 'temperature' must be a finite number, got inf"),
        ({"cfg_scale": one(np.nan, np.float32)}, "input 'cfg_scale' must be a finite number"),
        ({"top_k": one(-5, np.int32)}, "input 'top_k': top_k must be an integer >= -1"),
        ({"stop_words": np.array([[b"ok", b""]], dtype=np.object_)}, "input 'stop_words'[1] is an empty string"),
        ({"algorithm": one(b"\xff", np.object_)}, "input 'algorithm' is not valid UTF-8"),
        ({"seed": one(2**64 - 1, np.uint64)}, "input 'seed': seed must be an integer in [0, 9223372036854775807]"),
    ],
)
def test_bad_options_name_the_input(inputs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        parse_options(inputs, BOUNDS)
    assert message in str(error.value)


def test_engine_messages_name_the_input_they_concern() -> None:
    assert (
        name_inputs("prompt_token_ids[0] is the mask token id 9")
        == "input 'input_ids': prompt_token_ids[0] is the mask token id 9"
    )
    assert (
        name_inputs("block_length applies to LLaDA's algorithms")
        == "input 'block_length': block_length applies to LLaDA's algorithms"
    )


def test_text_input_is_required_and_not_empty() -> None:
    assert text_input({"text_input": one("héllo".encode(), np.object_)}) == "héllo"
    with pytest.raises(InvalidInputError, match="'text_input' is required"):
        text_input({})
    with pytest.raises(InvalidInputError, match="'text_input' is empty"):
        text_input({"text_input": one(b"", np.object_)})


def parameters(**values: str) -> dict:
    return {"parameters": {key: {"string_value": value} for key, value in values.items()}}


def test_settings_parse_strings_and_treat_empty_or_placeholders_as_default() -> None:
    settings = BackendSettings.from_model_config(
        parameters(model="", max_num_seqs="8", trust_remote_code="yes", seed="${seed}", EXECUTION_ENV_PATH="x")
    )
    assert settings.model == "vdiff-demo" and settings.max_num_seqs == 8 and settings.trust_remote_code
    assert settings.seed == 0 and settings.max_num_batched_tokens is None and settings.verifier is None
    assert settings.engine_config().max_num_seqs == 8


def test_the_verifier_flag_reaches_the_engine_config() -> None:
    values = model_parameters(openai_parser().parse_args(["--verifier", "vdiff-demo-ar"]))
    assert values["verifier"] == "vdiff-demo-ar"
    settings = BackendSettings.from_model_config(parameters(**values))
    assert settings.engine_config().verifier == "vdiff-demo-ar"
    assert model_parameters(openai_parser().parse_args([]))["verifier"] == ""  # none: APD is refused


def test_the_batch_invariant_flag_reaches_the_engine_config() -> None:
    values = model_parameters(openai_parser().parse_args(["--batch-invariant"]))
    assert values == model_parameters(triton_parser().parse_args(["--batch-invariant"])) | {"model": "vdiff-demo"}
    assert values["batch_invariant"] == "true"
    assert BackendSettings.from_model_config(parameters(**values)).engine_config().batch_invariant
    default = model_parameters(openai_parser().parse_args([]))
    assert not BackendSettings.from_model_config(parameters(**default)).engine_config().batch_invariant


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_num_seq": "8"}, "unknown parameters ['max_num_seq']"),
        ({"max_num_seqs": "many"}, "parameter max_num_seqs must be an integer, got 'many'"),
        ({"trust_remote_code": "maybe"}, "parameter trust_remote_code must be true or false"),
        ({"max_queue_size": "-1"}, "parameter max_queue_size must be >= 0"),
    ],
)
def test_bad_settings_are_refused_by_name(values: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        BackendSettings.from_model_config(parameters(**values))
    assert message in str(error.value)


def test_render_sets_parameters_in_every_config_that_declares_them(tmp_path: Path) -> None:
    target = render_repository(tmp_path / "repo", {"model": '/models/a "b" ü', "max_num_seqs": "4"})
    for name in ("tokenizer", "diffusion_denoise"):  # the detokenizer decodes nothing: no model
        assert read_parameters((target / name / "config.pbtxt").read_text())["model"] == '/models/a "b" ü'
    denoiser = read_parameters((target / "diffusion_denoise" / "config.pbtxt").read_text())
    assert denoiser["max_num_seqs"] == "4" and denoiser["max_queue_size"] == "32"
    assert (target / "diffusion_denoise" / "1" / "model.py").is_file()
    assert set_parameters('{ key: "a" value: { string_value: "x" } }', {"b": "y"}) == (
        '{ key: "a" value: { string_value: "x" } }',
        set(),
    )
    with pytest.raises(ValueError, match=r"declares the parameters \['no_such'\]"):
        render_repository(tmp_path / "other", {"no_such": "1"})


def load_config(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((SOURCE / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def declared(config: model_config_pb2.ModelConfig) -> dict[str, tuple[str, list[int]]]:
    return {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input}


def test_the_configs_declare_every_option_the_parser_knows() -> None:
    expected = {o.name: (o.triton_type, [-1] if o.name in LIST_OPTIONS else [1]) for o in OPTIONS}
    for name in ("vdiff", "tokenizer", "diffusion_denoise"):
        inputs = declared(load_config(name))
        assert {k: v for k, v in inputs.items() if k in expected} == expected, name
        assert inputs["text_input"] == ("TYPE_STRING", [1])
        assert inputs["input_ids"] == ("TYPE_INT32", [-1])
    assert set(declared(load_config("vdiff"))) == set(expected) | {"text_input", "input_ids"}


def test_the_ensemble_wires_every_input_and_feeds_the_detokenizer_only_from_the_denoiser() -> None:
    ensemble = load_config("vdiff")
    tokenizer, denoiser, detokenizer = ensemble.ensemble_scheduling.step
    public = set(declared(ensemble))
    assert set(tokenizer.input_map.values()) == public
    # the public input_ids go to the tokenizer, which checks them; the denoiser gets the tokenizer's
    assert set(denoiser.input_map.values()) == public - {"input_ids"} | {"_input_ids"}
    assert set(detokenizer.input_map.values()) <= set(denoiser.output_map.values())
    assert {o.name for o in ensemble.output} == set(detokenizer.output_map.values())
    assert load_config("diffusion_denoise").model_transaction_policy.decoupled
