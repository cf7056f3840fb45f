"""TensorRT back ends, engine builds, the deployment bundle and the runtime."""
