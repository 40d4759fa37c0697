"""Video input: decoding with PyAV, clip sampling, spatial transforms, and a synthetic dataset (`synth`)."""
