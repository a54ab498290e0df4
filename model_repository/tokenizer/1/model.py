"""Triton adapter: text_input (or input_ids as sent) -> prompt ids, after validating every option."""

import json

import triton_python_backend_utils as pb_utils

from vdiff.backend.inputs import InvalidInputError, parse_options, prompt_ids
from vdiff.backend.settings import BackendSettings
from vdiff.backend.tensors import tokenizer_outputs
from vdiff.bounds import RequestBounds
from vdiff.models import Checkpoint
from vdiff.tokenizer import Tokenizer
from vdiff_client.codes import ErrorCode, tagged


class TritonPythonModel:
    def initialize(self, args):
        settings = BackendSettings.from_model_config(json.loads(args["model_config"]))
        checkpoint = Checkpoint.open(settings.model)
        self.tokenizer = Tokenizer.load(checkpoint, settings.tokenizer, settings.trust_remote_code)
        self.bounds = RequestBounds(
            checkpoint.max_length,
            self.tokenizer.vocab_size,
            self.tokenizer.longest_token_chars,
            settings.max_stop_strings,
        )

    def execute(self, requests):
        return [self._encode(request) for request in requests]

    def _encode(self, request):
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        try:
            _, options = parse_options(inputs, self.bounds)
            if options.echo and "text_input" not in inputs:
                raise InvalidInputError("exclude_input_in_output=false echoes 'text_input'; send the prompt as text")
            ids = prompt_ids(inputs, self.tokenizer.encode, self.bounds)
        except InvalidInputError as error:
            message = tagged(ErrorCode.INVALID_INPUT, str(error))
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
        tensors = [pb_utils.Tensor(name, array) for name, array in tokenizer_outputs(ids).items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)
