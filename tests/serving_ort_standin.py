"""model.py of a Python-backend stand-in for an `onnxruntime_onnx` model (the tritonserver that
nvidia-pytriton ships has no ONNX Runtime backend): runs the model's own 1/model.onnx with ONNX
Runtime, inputs and outputs by the names in its config.pbtxt. The tests use it to run the
generated ensemble on a real server."""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            values = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in
                                                         zip(self.outputs, values, strict=True)]))
        return responses
