"""Reading a target's signatures: which input takes images, which outputs are labels/scores.

Shared by every client that sees TF Serving metadata (gRPC, REST) or a SavedModel.
"""

from __future__ import annotations

import dataclasses

from copycat_tf import contract
from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import TargetInfo


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A signature tensor: dtype (a tf.DType) and shape (None: unknown rank; -1: any size)."""

    dtype: object
    shape: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class ChosenSignature:
    """The parts of a signature the attack uses.

    Attributes:
      name: the signature key.
      input: alias of the image input [N, H, W, C].
      input_dtype: its tf.DType.
      input_shape: (H, W, C).
      labels_out, scores_out: aliases of the label and score outputs (None: absent).
      outputs: every output alias and its TensorInfo.
    """

    name: str
    input: str
    input_dtype: object
    input_shape: tuple[int, int, int]
    labels_out: str | None
    scores_out: str | None
    outputs: dict[str, TensorInfo]

    def target_info(self, url: str, details: dict) -> TargetInfo:
        """What the attack knows of a target answering through this signature."""
        return TargetInfo(
            url=url,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            has_scores=self.scores_out is not None,
            details={**details, "outputs": sorted(self.outputs)},
        )

    @property
    def num_classes(self) -> int:
        """K from the scores' shape [N, K] (0 when unknown)."""
        if not self.scores_out:
            return 0
        shape = self.outputs[self.scores_out].shape
        return int(shape[1]) if shape and len(shape) == 2 and shape[1] > 0 else 0


def parse_model_path(url: str, path: str) -> tuple[str, int | None, str | None]:
    """(<model>, version, label) from '<model>[/versions/N|/labels/L]'.

    Raises:
      UserInputError: the path does not name a model that way.
    """
    parts = [p for p in path.split("/") if p]
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 3 and parts[1] == "versions" and parts[2].isdigit():
        return parts[0], int(parts[2]), None
    if len(parts) == 3 and parts[1] == "labels":
        return parts[0], None, parts[2]
    raise UserInputError(
        f"target URL {url!r}: expected .../<model>, .../<model>/versions/<N> or "
        ".../<model>/labels/<label>"
    )


def signature_def_io(sig) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """Inputs and outputs of a SignatureDef proto.

    Tensors of DT_INVALID (TF2's __saved_model_init_op NoOp) are left out.
    """
    import tensorflow as tf

    def infos(tensors):
        out = {}
        for alias, t in tensors.items():
            if t.dtype == 0:
                continue
            shape = None
            if not t.tensor_shape.unknown_rank:
                shape = tuple(d.size for d in t.tensor_shape.dim)
            out[alias] = TensorInfo(tf.as_dtype(t.dtype), shape)
        return out

    return infos(sig.inputs), infos(sig.outputs)


def _image_input(url: str, inputs: dict[str, TensorInfo]):
    for alias, info in inputs.items():
        if info.dtype.name != "string" and info.shape is not None and len(info.shape) == 4:
            if min(info.shape[1:]) < 1:
                raise UserInputError(
                    f"target {url}: input {alias!r} has shape {info.shape}; H, W and C must be "
                    "fixed"
                )
            return alias, info.dtype, tuple(int(d) for d in info.shape[1:])
    raise UserInputError(
        f"target {url}: its signature has no image input of shape [N, H, W, C]: {inputs}"
    )


def select_outputs(outputs: dict[str, TensorInfo]) -> tuple[str | None, str | None]:
    """(labels output, scores output).

    Prefers the contract's names (`classes`, `scores`) when their types fit; otherwise an
    integer output of rank 1 is taken as labels and a float output of rank 2 as scores.
    """

    def is_labels(info):
        return info.dtype.is_integer and info.shape is not None and len(info.shape) == 1

    def is_scores(info):
        return info.dtype.is_floating and info.shape is not None and len(info.shape) == 2

    labels = contract.OUTPUT_CLASSES if contract.OUTPUT_CLASSES in outputs else None
    scores = contract.OUTPUT_SCORES if contract.OUTPUT_SCORES in outputs else None
    if labels and not outputs[labels].dtype.is_integer:
        labels = None
    if scores and not outputs[scores].dtype.is_floating:
        scores = None
    for alias, info in sorted(outputs.items()):
        if labels is None and is_labels(info):
            labels = alias
        if scores is None and is_scores(info):
            scores = alias
    return labels, scores


def choose_signature(
    url: str, name: str, inputs: dict[str, TensorInfo], outputs: dict[str, TensorInfo]
) -> ChosenSignature:
    """The image input and label/score outputs of one signature.

    Raises:
      UserInputError: no image input, or no class or score output.
    """
    alias, dtype, shape = _image_input(url, inputs)
    labels_out, scores_out = select_outputs(outputs)
    if labels_out is None and scores_out is None:
        raise UserInputError(f"target {url}: no class or score output in {outputs}")
    return ChosenSignature(name, alias, dtype, shape, labels_out, scores_out, outputs)


def choose_from_map(url: str, sigs, name: str) -> ChosenSignature:
    """`choose_signature` for signature `name` of a SignatureDefMap proto.

    Raises:
      UserInputError: no such signature, or it does not fit (see choose_signature).
    """
    if name not in sigs.signature_def:
        raise UserInputError(
            f"target {url} has no signature {name!r}; it has {sorted(sigs.signature_def)}"
        )
    inputs, outputs = signature_def_io(sigs.signature_def[name])
    return choose_signature(url, name, inputs, outputs)


def bytes_signature(sigs, chosen: ChosenSignature) -> tuple[str, str] | None:
    """(signature, input alias) taking encoded images (`*_bytes`, TF Serving's b64
    convention) with at least the chosen outputs, or None."""
    wanted = {a for a in (chosen.labels_out, chosen.scores_out) if a}
    for name, sig in sorted(sigs.signature_def.items()):
        inputs, outputs = signature_def_io(sig)
        if (
            len(inputs) == 1
            and next(iter(inputs)).endswith(contract.BYTES_SUFFIX)
            and set(outputs) >= wanted
        ):
            return name, next(iter(inputs))
    return None
