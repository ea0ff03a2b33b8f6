"""Engine tests: Pool, DeviceTable, kernels against naive references, stateful model, bad inputs."""
