"""Triton adapter for the denoising loop: execute() parses and enqueues; DenoiseService does the rest."""

import json

import torch
import triton_python_backend_utils as pb_utils

from vdiff.backend.inputs import InvalidInputError, bounded_text, input_ids, parse_options
from vdiff.backend.metrics import TritonMetrics
from vdiff.backend.service import DenoiseService, ServiceError
from vdiff.backend.settings import BackendSettings
from vdiff.backend.tensors import denoiser_outputs
from vdiff.engine import Engine
from vdiff_client.codes import ErrorCode, tagged

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSink:
    """One request's response sender, speaking the service's Sink protocol."""

    def __init__(self, sender):
        self.sender = sender

    def send(self, update, final):
        tensors = [pb_utils.Tensor(name, array) for name, array in denoiser_outputs(update).items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def fail(self, code, message):
        error = pb_utils.TritonError(tagged(code, message), getattr(pb_utils.TritonError, code.triton_kind))
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def is_cancelled(self):
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        self.settings = BackendSettings.from_model_config(json.loads(args["model_config"]))
        if self.settings.torch_num_threads:
            torch.set_num_threads(self.settings.torch_num_threads)
        engine = Engine(self.settings.engine_config())
        metrics = TritonMetrics(pb_utils, {"model": args["model_name"], "version": args["model_version"]})
        self.service = DenoiseService(engine, self.settings.max_queue_size, metrics)
        self.service.start()

    def execute(self, requests):
        for request in requests:
            self._accept(request)
        return None

    def _accept(self, request):
        sink = TritonSink(request.get_response_sender())
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        try:
            if "stop" in inputs and bool(inputs["stop"].reshape(-1)[0]):
                self._stop(request.request_id(), sink)
                return
            if "input_ids" not in inputs:
                raise InvalidInputError("input 'input_ids' is required (the prompt's token ids)")
            bounds = self.service.engine.bounds
            ids = input_ids(inputs, bounds)
            params, options = parse_options(inputs, bounds)
            echo = bounded_text(inputs, bounds) if options.echo else ""
            self.service.submit(request.request_id(), ids, echo, params, options, sink)
        except InvalidInputError as error:
            sink.fail(ErrorCode.INVALID_INPUT, str(error))
        except ServiceError as error:
            sink.fail(error.code, str(error))

    def _stop(self, request_id, sink):
        if not request_id:
            raise InvalidInputError("input 'stop': a stop request needs the id of the request to stop")
        if not self.service.alive:  # stop orders double as the proxy's liveness pings
            message = "the denoising service's threads have stopped"
            raise ServiceError(ErrorCode.UNAVAILABLE, message)
        self.service.stop(request_id)
        sink.sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)

    def finalize(self):
        self.service.shutdown(self.settings.shutdown_timeout_s)
