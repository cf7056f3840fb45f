"""Serving a bundle with NVIDIA Triton Inference Server: the model repository it becomes
(repository.py, config_pbtxt.py), the Python-backend models inside it (triton_models/) and the
request path they share (service.py: one input gate, a per-user cache of encoded state, the
compute of whatever the machine has), a local tritonserver (server.py) and a load test
(loadtest.py)."""
