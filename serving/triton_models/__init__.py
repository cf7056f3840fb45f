"""Sources of the model.py files a generated repository holds (copied, not imported here: they
import Triton's ``triton_python_backend_utils``, which exists only inside Triton's Python stub)."""
