"""Layer 2: data, models' sources, ONNX Runtime sessions, predictors, the parity policy and the one timing loop."""
