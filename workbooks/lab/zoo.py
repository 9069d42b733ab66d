"""The CIFAR-10 classifiers the paper attacks, as Keras 3 models.

Families follow the model zoo of the One Pixel Attack study the paper builds on
(lenet, pure_cnn, net_in_net, resnet, densenet, wide_resnet) plus the paper's own
``cnn`` (two convolutional and two fully connected layers). The definitions here are
ours; at ``width=1`` and default depth their sizes match the reported ones
(see ``REFERENCE``).

Every model follows the export contract of ``lab.export``: input ``image`` float32
(batch, 32, 32, 3) raw 0-255 RGB, per-channel normalisation *inside* the model (a
``Normalization`` layer with fixed mean/variance, so attacks work in pixel space),
output softmax over 10 classes.

Size knobs, for CPU smoke training (the ``quick`` profile of ``lab.train``):
``width`` scales every channel/unit count (minimum 2); ``depth`` sets the family's
usual depth number (resnet 6n+2, densenet-BC 6n+4, wide_resnet 6n+4); other
families have a fixed depth and reject it.
"""

from __future__ import annotations

from typing import Callable

NUM_CLASSES = 10
INPUT_SHAPE = (32, 32, 3)
# Per-channel statistics of the CIFAR-10 training set on the 0-255 scale.
MEAN = (125.307, 122.95, 113.865)
STD = (62.9932, 62.0887, 66.7048)

MODELS = ("cnn", "lenet", "pure_cnn", "net_in_net", "resnet", "densenet", "wide_resnet")

# Reported test accuracy / parameter counts of the zoo the paper attacked
# (None: the paper gives none for its own cnn).
REFERENCE: dict[str, dict[str, float | int | None]] = {
    "cnn": {"accuracy": None, "params": None},
    "lenet": {"accuracy": 0.749, "params": 62_000},
    "pure_cnn": {"accuracy": 0.888, "params": 1_370_000},
    "net_in_net": {"accuracy": 0.908, "params": 970_000},
    "resnet": {"accuracy": 0.923, "params": 470_000},
    "densenet": {"accuracy": 0.947, "params": 850_000},
    "wide_resnet": {"accuracy": 0.953, "params": 11_300_000},
}

DEFAULT_DEPTH = {"resnet": 32, "densenet": 100, "wide_resnet": 16}
WRN_WIDEN = 8  # WRN-16-8


def _keras():
    import keras

    return keras


def _ch(n: int, width: float) -> int:
    return max(2, int(round(n * width)))


def _stem(name: str):
    """Input plus in-model normalisation; returns (input, normalised tensor)."""
    keras = _keras()
    inp = keras.Input(INPUT_SHAPE, name="image", dtype="float32")
    x = keras.layers.Normalization(
        axis=-1, mean=list(MEAN), variance=[s * s for s in STD], name="normalize"
    )(inp)
    return inp, x


def _head(x, name: str):
    return _keras().layers.Activation("softmax", name="scores", dtype="float32")(x)


def _conv_bn_relu(x, filters, kernel, strides=1, padding="same", name=None):
    L = _keras().layers
    x = L.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False,
                 kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def _bn_relu(x, name):
    L = _keras().layers
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


# --- families ---------------------------------------------------------------------

def _cnn(width: float):
    """The paper's cnn: conv-pool, conv-pool, dense, dense (about 0.55M params)."""
    L = _keras().layers
    inp, x = _stem("cnn")
    x = L.Conv2D(_ch(32, width), 3, padding="same", activation="relu", name="conv1")(x)
    x = L.MaxPooling2D(name="pool1")(x)
    x = L.Conv2D(_ch(64, width), 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dropout(0.3, name="drop1")(x)
    x = L.Dense(_ch(128, width), activation="relu", name="fc1")(x)
    x = L.Dropout(0.3, name="drop2")(x)
    x = L.Dense(NUM_CLASSES, name="fc2")(x)
    return inp, _head(x, "cnn")


def _lenet(width: float):
    """LeNet-5 on colour input: 6/16 5x5 convs, 120-84-10 dense (62k params)."""
    L = _keras().layers
    inp, x = _stem("lenet")
    x = L.Conv2D(_ch(6, width), 5, activation="relu", kernel_initializer="he_normal", name="conv1")(x)
    x = L.MaxPooling2D(name="pool1")(x)
    x = L.Conv2D(_ch(16, width), 5, activation="relu", kernel_initializer="he_normal", name="conv2")(x)
    x = L.MaxPooling2D(name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(_ch(120, width), activation="relu", kernel_initializer="he_normal", name="fc1")(x)
    x = L.Dense(_ch(84, width), activation="relu", kernel_initializer="he_normal", name="fc2")(x)
    x = L.Dense(NUM_CLASSES, name="fc3")(x)
    return inp, _head(x, "lenet")


def _pure_cnn(width: float):
    """All-convolutional net (All-CNN-C): strided convs instead of pooling, 1x1 head."""
    L = _keras().layers
    inp, x = _stem("pure_cnn")
    a, b = _ch(96, width), _ch(192, width)
    x = L.Dropout(0.2, name="drop_in")(x)
    x = _conv_bn_relu(x, a, 3, name="c1")
    x = _conv_bn_relu(x, a, 3, name="c2")
    x = _conv_bn_relu(x, a, 3, strides=2, name="c3")
    x = L.Dropout(0.5, name="drop1")(x)
    x = _conv_bn_relu(x, b, 3, name="c4")
    x = _conv_bn_relu(x, b, 3, name="c5")
    x = _conv_bn_relu(x, b, 3, strides=2, name="c6")
    x = L.Dropout(0.5, name="drop2")(x)
    x = _conv_bn_relu(x, b, 3, padding="valid", name="c7")
    x = _conv_bn_relu(x, b, 1, name="c8")
    x = L.Conv2D(NUM_CLASSES, 1, name="c9")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return inp, _head(x, "pure_cnn")


def _net_in_net(width: float):
    """Network in Network: three mlpconv blocks (kxk conv + two 1x1), global average pool."""
    L = _keras().layers
    inp, x = _stem("net_in_net")
    c = lambda n: _ch(n, width)  # noqa: E731
    x = _conv_bn_relu(x, c(192), 5, name="b1a")
    x = _conv_bn_relu(x, c(160), 1, name="b1b")
    x = _conv_bn_relu(x, c(96), 1, name="b1c")
    x = L.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = L.Dropout(0.5, name="drop1")(x)
    x = _conv_bn_relu(x, c(192), 5, name="b2a")
    x = _conv_bn_relu(x, c(192), 1, name="b2b")
    x = _conv_bn_relu(x, c(192), 1, name="b2c")
    x = L.AveragePooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = L.Dropout(0.5, name="drop2")(x)
    x = _conv_bn_relu(x, c(192), 3, name="b3a")
    x = _conv_bn_relu(x, c(192), 1, name="b3b")
    x = L.Conv2D(NUM_CLASSES, 1, name="b3c")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return inp, _head(x, "net_in_net")


def _resnet(width: float, depth: int):
    """ResNet v1 for CIFAR (depth 6n+2; 32 gives ~0.47M params), 16/32/64 filters."""
    L = _keras().layers
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"resnet depth must be 6n+2 >= 8, got {depth}")
    n = (depth - 2) // 6
    inp, x = _stem("resnet")
    x = _conv_bn_relu(x, _ch(16, width), 3, name="stem")
    for stage, base in enumerate((16, 32, 64)):
        filters = _ch(base, width)
        for block in range(n):
            tag = f"s{stage + 1}b{block + 1}"
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = _conv_bn_relu(x, filters, 3, strides=strides, name=f"{tag}a")
            y = L.Conv2D(filters, 3, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=f"{tag}b_conv")(y)
            y = L.BatchNormalization(name=f"{tag}b_bn")(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = L.Conv2D(filters, 1, strides=strides, use_bias=False,
                                    kernel_initializer="he_normal", name=f"{tag}_proj")(shortcut)
                shortcut = L.BatchNormalization(name=f"{tag}_proj_bn")(shortcut)
            x = L.Add(name=f"{tag}_add")([shortcut, y])
            x = L.ReLU(name=f"{tag}_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(NUM_CLASSES, kernel_initializer="he_normal", name="fc")(x)
    return inp, _head(x, "resnet")


def _densenet(width: float, depth: int):
    """DenseNet-BC (depth 6n+4; 100 with growth 12 gives ~0.8M params), compression 0.5."""
    L = _keras().layers
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"densenet depth must be 6n+4 >= 10, got {depth}")
    n = (depth - 4) // 6
    growth = _ch(12, width)
    inp, x = _stem("densenet")
    x = L.Conv2D(2 * growth, 3, padding="same", use_bias=False,
                 kernel_initializer="he_normal", name="stem_conv")(x)
    for block in range(3):
        for layer in range(n):
            tag = f"d{block + 1}l{layer + 1}"
            y = _bn_relu(x, f"{tag}a")
            y = L.Conv2D(4 * growth, 1, use_bias=False, kernel_initializer="he_normal", name=f"{tag}a_conv")(y)
            y = _bn_relu(y, f"{tag}b")
            y = L.Conv2D(growth, 3, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=f"{tag}b_conv")(y)
            x = L.Concatenate(name=f"{tag}_cat")([x, y])
        if block < 2:
            tag = f"t{block + 1}"
            x = _bn_relu(x, tag)
            x = L.Conv2D(int(x.shape[-1]) // 2, 1, use_bias=False,
                         kernel_initializer="he_normal", name=f"{tag}_conv")(x)
            x = L.AveragePooling2D(2, name=f"{tag}_pool")(x)
    x = _bn_relu(x, "final")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(NUM_CLASSES, name="fc")(x)
    return inp, _head(x, "densenet")


def _wide_resnet(width: float, depth: int):
    """Wide ResNet WRN-d-8 (pre-activation, depth 6n+4; 16 gives ~11M params)."""
    L = _keras().layers
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"wide_resnet depth must be 6n+4 >= 10, got {depth}")
    n = (depth - 4) // 6
    inp, x = _stem("wide_resnet")
    x = L.Conv2D(_ch(16, width), 3, padding="same", use_bias=False,
                 kernel_initializer="he_normal", name="stem_conv")(x)
    for stage, base in enumerate((16, 32, 64)):
        filters = _ch(base * WRN_WIDEN, width)
        for block in range(n):
            tag = f"s{stage + 1}b{block + 1}"
            strides = 2 if stage > 0 and block == 0 else 1
            pre = _bn_relu(x, f"{tag}a")
            y = L.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=f"{tag}a_conv")(pre)
            y = _bn_relu(y, f"{tag}b")
            y = L.Dropout(0.3, name=f"{tag}_drop")(y)
            y = L.Conv2D(filters, 3, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=f"{tag}b_conv")(y)
            if strides != 1 or x.shape[-1] != filters:
                x = L.Conv2D(filters, 1, strides=strides, use_bias=False,
                             kernel_initializer="he_normal", name=f"{tag}_proj")(pre)
            x = L.Add(name=f"{tag}_add")([x, y])
    x = _bn_relu(x, "final")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(NUM_CLASSES, name="fc")(x)
    return inp, _head(x, "wide_resnet")


_BUILDERS: dict[str, Callable] = {
    "cnn": _cnn,
    "lenet": _lenet,
    "pure_cnn": _pure_cnn,
    "net_in_net": _net_in_net,
    "resnet": _resnet,
    "densenet": _densenet,
    "wide_resnet": _wide_resnet,
}


def build(name: str, width: float = 1.0, depth: int | None = None):
    """A fresh, uncompiled ``keras.Model`` of family ``name`` (raw 0-255 in, softmax out).

    ``width`` scales channels/units; ``depth`` (resnet, densenet, wide_resnet only)
    sets the family's depth number, default the paper-size one (``DEFAULT_DEPTH``).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    keras = _keras()
    if name in DEFAULT_DEPTH:
        inp, out = _BUILDERS[name](width, int(depth or DEFAULT_DEPTH[name]))
    else:
        if depth is not None:
            raise ValueError(f"{name} has a fixed depth; depth={depth} is not supported")
        inp, out = _BUILDERS[name](width)
    return keras.Model(inp, out, name=name)
