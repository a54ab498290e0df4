"""Triton adapter: one denoiser response -> the public outputs (text delta and counts).

Triton does not tell a running ensemble step that its client cancelled, but it does cancel the
ensemble's next step request. When such a request arrives here, the denoiser is told to stop the
request (a stop order with its key), so its work ends at the denoiser's next step.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from vdiff.backend.settings import BackendSettings
from vdiff.backend.tensors import detokenizer_outputs, request_key
from vdiff.tokenizer import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        self.settings = BackendSettings.from_model_config(json.loads(args["model_config"]))
        self.tokenizer = Tokenizer.load(self.settings.model, self.settings.tokenizer, self.settings.trust_remote_code)

    def execute(self, requests):
        return [self._detokenize(request) for request in requests]

    def _detokenize(self, request):
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        if request.is_cancelled():
            self._stop_denoising(request_key(inputs))
        outputs = detokenizer_outputs(self.tokenizer, inputs)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def _stop_denoising(self, key):
        stop = pb_utils.Tensor("stop", np.array([[True]]))
        order = pb_utils.InferenceRequest(
            model_name=self.settings.denoiser_model, requested_output_names=[], inputs=[stop], request_id=key
        )
        for response in order.exec(decoupled=True):
            if response.has_error():
                pb_utils.Logger.log_warn(f"stop order for {key} failed: {response.error().message()}")
