"""The classic Keras CNN, from Keras to a verified ONNX Runtime deployment with onnxpipe.

Keras 3 on the PyTorch backend (no TensorFlow needed) trains the Sequential CNN from the Keras
examples on the digits data, resized to 28x28x1 (channels last, as Keras has it); Keras's own
exporter writes the ONNX file; `onnxpipe import` makes a run folder around it, with `onnx` as the
root variant, and this script checks that ONNX Runtime gives Keras's predictions.

    pip install -e ".[keras]"
    python examples/keras_cnn.py --epochs 5       # -> exports/keras_cnn.onnx and the run folder exports/keras_cnn/
    onnxpipe quantize exports/keras_cnn && onnxpipe verify exports/keras_cnn && onnxpipe serve exports/keras_cnn

The training data come from onnxpipe's own loader (same seeded split, same scaling and
standardization) so that `onnxpipe import --data digits` measures the model on the data it expects.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # must be set before keras is imported


def build_model(num_classes: int = 10):
    """Conv2D 32 / MaxPooling / Conv2D 64 / MaxPooling / Conv2D 64 / Flatten / Dense 64 / Dense 10 softmax."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input(shape=(28, 28, 1), name="image"),
        layers.Conv2D(32, 3, activation="relu"),     # (N, 26, 26, 32)
        layers.MaxPooling2D(2),                      # (N, 13, 13, 32)
        layers.Conv2D(64, 3, activation="relu"),     # (N, 11, 11, 64)
        layers.MaxPooling2D(2),                      # (N, 5, 5, 64)
        layers.Conv2D(64, 3, activation="relu"),     # (N, 3, 3, 64)
        layers.Flatten(),                            # (N, 576)
        layers.Dense(64, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="keras_cnn")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="Train on a seeded subset of N samples.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("exports/keras_cnn"), help="Run folder to create.")
    parser.add_argument("--onnx", type=Path, default=None, help="Where Keras writes the ONNX file (default: beside the run).")
    parser.add_argument("--json", action="store_true", help="Print the result as one JSON line.")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from onnxpipe.core.data import load_dataset
    from onnxpipe.stages.importer import import_onnx
    from onnxpipe.core.runtime import make_session

    if keras.backend.backend() != "torch":
        raise SystemExit(f"this example runs Keras on the torch backend; KERAS_BACKEND is {keras.backend.backend()!r}")
    keras.utils.set_random_seed(args.seed)
    ds = load_dataset("digits", "image", image_size=28, seed=args.seed, limit=args.limit, layout="nhwc")

    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(ds.x_train.first, ds.y_train, validation_data=(ds.x_val.first, ds.y_val), epochs=args.epochs, batch_size=32,
              verbose=0)
    keras_probs = model.predict(ds.x_test.first, verbose=0)
    keras_acc = float((keras_probs.argmax(1) == ds.y_test).mean())

    onnx_path = args.onnx or args.out.with_name(args.out.name + ".onnx")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the tracer's notes on Keras's shape checks are not actionable here
        warnings.filterwarnings("ignore", message=".*might cause the trace to be incorrect")
        model.export(str(onnx_path), format="onnx", verbose=False)   # Keras's own exporter (torch backend)

    # The same as `onnxpipe import <onnx_path> --data digits --run <out>`.
    run = import_onnx(onnx_path, args.out, data="digits", seed=args.seed, limit=args.limit, force=True)
    session = make_session(run.path("onnx"), device="cpu")
    onnx_probs = session(ds.x_test.first)
    result = {
        "run": str(run.root),
        "keras_accuracy": keras_acc,
        "onnx_accuracy": run.metrics("onnx")["accuracy"],
        "max_abs": float(np.max(np.abs(onnx_probs - keras_probs))),
        "agreement": float((onnx_probs.argmax(1) == keras_probs.argmax(1)).mean()),
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"Keras test accuracy {result['keras_accuracy']:.4f}; ONNX Runtime {result['onnx_accuracy']:.4f}; "
          f"max abs difference {result['max_abs']:.2e}, top-1 agreement {result['agreement']:.4f} -> {run.root}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
