"""Triton adapter: text_input -> prompt ids, after validating every option of the request."""

import json

import triton_python_backend_utils as pb_utils

from vdiff.backend.inputs import InvalidInputError, parse_options, text_input
from vdiff.backend.settings import BackendSettings
from vdiff.backend.tensors import tokenizer_outputs
from vdiff.tokenizer import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        settings = BackendSettings.from_model_config(json.loads(args["model_config"]))
        self.tokenizer = Tokenizer.load(settings.model, settings.tokenizer, settings.trust_remote_code)

    def execute(self, requests):
        return [self._encode(request) for request in requests]

    def _encode(self, request):
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        try:
            parse_options(inputs)
            ids = self.tokenizer.encode(text_input(inputs))
        except InvalidInputError as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
        tensors = [pb_utils.Tensor(name, array) for name, array in tokenizer_outputs(ids).items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)
