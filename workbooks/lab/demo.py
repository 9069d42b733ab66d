"""`make demo`: serving + sidecar on loopback, real CIFAR-10 test images, and a
short live attack.

1. classify a few real test images through the sidecar: label, confidence, latency;
2. search 1-pixel changes of one image against the BARE backend (what an attacker
   without hashguard sees) and keep the one that hurts the true class most;
3. send the clean image and then that 1-pixel copy through the sidecar in one
   session: the sidecar answers the copy with the clean image's result.

Servers are stopped on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from .cifar10 import LABELS, load_cifar10
from .client import SidecarClient, new_session_id
from .launcher import Lab, SidecarSpec


def backend_scores(target: str, model: str, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model
        req.inputs["image"].CopyFrom(tf.make_tensor_proto(images.astype(np.float32)))
        resp = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=60)
        return tf.make_ndarray(resp.outputs["scores"])


def one_pixel_candidates(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.repeat(img[None], n, axis=0)
    ys, xs = rng.integers(0, 32, n), rng.integers(0, 32, n)
    out[np.arange(n), ys, xs] = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    return out


def describe(scores: np.ndarray) -> str:
    k = int(np.argmax(scores))
    return f"{LABELS[k]:<10} {scores[k]:7.2%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.demo")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--models-dir", default="models")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--candidates", type=int, default=2000)
    args = ap.parse_args(argv)

    data = load_cifar10()
    x, y = data.x_test, data.y_test
    rng = np.random.default_rng(7)
    print(f"CIFAR-10 test images from {data.source.rsplit('/', 1)[-1]}; starting serving + sidecar ...", flush=True)
    # Exact scores so the demo shows Algorithm 1 plainly; deployments add keyed
    # score noise by default (docs/threat-model.md).
    spec = SidecarSpec("sidecar", mode="paper", padding="distribution",
                       args=("--score-noise", "0", "--score-precision", "0"))
    with Lab(args.models_dir, [args.model], [spec]) as st:
        address = st.sidecar("sidecar").address
        print(f"serving at {st.backend}, hashguard sidecar at {address} (mode paper, padding distribution)\n")
        with SidecarClient(address, args.model, new_session_id("demo")) as p:
            print(f"{'#':>3}  {'truth':<10} {'answer':<10} {'conf':>6} {'latency':>9}")
            for i in range(args.images):
                label, scores, dt = p.classify(x[i])
                print(f"{i:>3}  {LABELS[y[i]]:<10} {LABELS[label]:<10} {scores[label]:6.1%} {dt * 1e3:7.2f} ms")

        # Live attack on the first correctly classified image.
        clean_all = backend_scores(st.backend, args.model, x[:50])
        idx = next(i for i in range(50) if np.argmax(clean_all[i]) == y[i])
        img, truth = x[idx], int(y[idx])
        cands = one_pixel_candidates(img, args.candidates, rng)
        bare = backend_scores(st.backend, args.model, cands)
        best = int(np.argmin(bare[:, truth]))
        adv = cands[best]
        flipped = int(np.argmax(bare[best])) != truth
        metrics = st.counters("sidecar")
        before = metrics.snapshot(args.model)
        with SidecarClient(address, args.model, new_session_id("attacker")) as p:
            _, s_clean, _ = p.classify(img)
            _, s_adv, _ = p.classify(adv)
        after = metrics.snapshot(args.model)
        forwarded = after["forwards"] - before["forwards"]
        cached = after["cached"] - before["cached"]
        print(f"\nLive 1-pixel attack on test image {idx} (truth: {LABELS[truth]}), "
              f"best of {args.candidates} random 1-pixel changes:")
        print(f"  bare backend, clean image      : {describe(clean_all[idx])}")
        print(f"  bare backend, 1-pixel copy     : {describe(bare[best])}   "
              f"(true-class confidence {clean_all[idx][truth]:.2%} -> {bare[best][truth]:.2%})")
        print(f"  hashguard, clean then the copy : {describe(s_clean)} then {describe(s_adv)}")
        same = np.array_equal(s_clean, s_adv) and forwarded == 1 and cached == 1
        verdict = ("the label flipped on the bare backend" if flipped else "the confidence moved on the bare backend")
        print(f"  sidecar metrics                : {forwarded:.0f} image forwarded to the model, {cached:.0f} answered from the anchor")
        print(f"\n{verdict}; through hashguard the copy got the clean image's answer: {'yes' if same else 'NO'}")
    print("servers stopped.")
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped.")
        sys.exit(130)
