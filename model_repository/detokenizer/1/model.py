"""Triton adapter: one denoiser response -> the public outputs, passed on as they came.

The denoiser decodes each answer incrementally as its tokens settle (vdiff/detokenizer.py), so
its responses already carry their text; this step keeps the ensemble in TensorRT-LLM's shape and
handles cancellation. Triton does not tell a running ensemble step that its client cancelled, but
it does cancel the ensemble's next step request. When such a request arrives here, the denoiser is
told to stop the request (a stop order with its key), so its work ends at the denoiser's next step.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from vdiff.backend.settings import BackendSettings
from vdiff.backend.tensors import PASSED_ON, request_key


class TritonPythonModel:
    def initialize(self, args):
        self.settings = BackendSettings.from_model_config(json.loads(args["model_config"]))

    def execute(self, requests):
        return [self._pass_on(request) for request in requests]

    def _pass_on(self, request):
        tensors = {tensor.name(): tensor for tensor in request.inputs()}
        if request.is_cancelled():
            self._stop_denoising(request_key(tensors["request_key"].as_numpy()))
        outputs = [tensor for name, tensor in tensors.items() if name in PASSED_ON]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _stop_denoising(self, key):
        stop = pb_utils.Tensor("stop", np.array([[True]]))
        order = pb_utils.InferenceRequest(
            model_name=self.settings.denoiser_model, requested_output_names=[], inputs=[stop], request_id=key
        )
        for response in order.exec(decoupled=True):
            if response.has_error():
                pb_utils.Logger.log_warn(f"stop order for {key} failed: {response.error().message()}")
