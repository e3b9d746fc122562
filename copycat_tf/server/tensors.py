"""Tensors on the wire: TensorProto <-> numpy (gRPC) and JSON <-> numpy (REST).

Decoding follows TF's Tensor::FromProto (tensor_content, else the typed *_val field with
the last value repeated); encoding uses typed *_val fields as TF Serving does. JSON
follows TF Serving's json_tensor.cc rules (reference §1.4, §1.5), including its float
formatting.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from copycat_tf.server.status import invalid

# DataType -> (numpy dtype, typed TensorProto field)
_PROTO_FIELDS = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_HALF: (np.float16, "half_val"),  # IEEE half bit patterns in an int field
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT16: (np.int16, "int_val"),
    types_pb2.DT_INT8: (np.int8, "int_val"),
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val"),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val"),
    types_pb2.DT_STRING: (np.object_, "string_val"),
}
_TYPE_NAMES = {
    tf.float32: "float",
    tf.float64: "double",
    tf.int32: "int32",
    tf.int16: "int16",
    tf.int8: "int8",
    tf.uint8: "uint8",
    tf.int64: "int64",
    tf.uint32: "uint32",
    tf.uint64: "uint64",
    tf.bool: "bool",
    tf.string: "string",
}


# ----------------------------------------------------------------------------- gRPC


# Largest tensor a request may declare (bytes once decoded): a 39-byte request must not
# make the server allocate gigabytes by declaring dims it does not send.
MAX_TENSOR_BYTES = 256 << 20
_POINTER_BYTES = 8  # one element of a string tensor (a Python object reference)


def proto_to_numpy(
    proto: tensor_pb2.TensorProto, alias: str, max_bytes: int = MAX_TENSOR_BYTES
) -> np.ndarray:
    """Decodes a request TensorProto, checking its declared size before allocating.

    Raises:
      ServingError: INVALID_ARGUMENT "tensor parsing error: <alias>" when it cannot be read
        or declares more than max_bytes.
    """
    entry = _PROTO_FIELDS.get(proto.dtype)
    if entry is None or proto.tensor_shape.unknown_rank:
        raise invalid(f"tensor parsing error: {alias}")
    np_dtype, field = entry
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise invalid(f"tensor parsing error: {alias}")
    count = math.prod(shape)
    itemsize = _POINTER_BYTES if proto.dtype == types_pb2.DT_STRING else np.dtype(np_dtype).itemsize
    if count * itemsize > max_bytes or any(d > max_bytes for d in shape):
        raise invalid(
            f"tensor parsing error: {alias} declares {count} elements, more than this server "
            f"decodes in one tensor ({max_bytes} bytes)"
        )
    if proto.tensor_content and proto.dtype != types_pb2.DT_STRING:
        content = proto.tensor_content
        if len(content) != count * np.dtype(np_dtype).itemsize:
            raise invalid(f"tensor parsing error: {alias}")
        return np.frombuffer(content, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape)
    values = getattr(proto, field)
    n = len(values)
    if proto.dtype == types_pb2.DT_STRING:
        flat = np.empty(count, dtype=object)
        items = list(values[:count])
        if items:
            items += [items[-1]] * (count - len(items))
        else:
            items = [b""] * count
        flat[:] = items
        return flat.reshape(shape)
    if n == 0:
        return np.zeros(shape, np_dtype)
    if proto.dtype == types_pb2.DT_HALF:
        flat = np.asarray(values[:count], np.uint16).view(np.float16)
    else:
        flat = np.asarray(values[:count] if n >= count else values, dtype=np_dtype)
    if n < count:  # TF repeats the last value to fill the shape
        flat = np.concatenate([flat, np.full(count - n, flat[-1], np_dtype)])
    return flat.reshape(shape)


def numpy_to_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """Encodes a response tensor with typed *_val fields (TF Serving's default)."""
    array = np.asarray(array)
    dtype = tf.as_dtype(array.dtype if array.dtype != object else tf.string)
    proto = tensor_pb2.TensorProto(
        dtype=dtype.as_datatype_enum,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
        ),
    )
    field = _PROTO_FIELDS[dtype.as_datatype_enum][1]
    flat = array.ravel()
    if dtype == tf.string:
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    elif dtype == tf.float16:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(proto, field).extend(flat.tolist())
    return proto


# ----------------------------------------------------------------------------- JSON in


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _type_error(value, dtype: tf.DType):
    dump = json.dumps(value)[:256]
    return invalid(
        f"JSON Value: {dump} Type: {_json_type(value)} is not of expected type: "
        f"{_TYPE_NAMES.get(dtype, dtype.name)}"
    )


def _scalar(value, dtype: tf.DType):
    """Checks one JSON scalar against a dtype as AddValueToTensor does; returns it."""
    if dtype == tf.string:
        if isinstance(value, str):
            try:
                return value.encode()
            except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
                raise invalid("JSON Parse error: Invalid encoding in string.") from None
        if isinstance(value, dict) and len(value) == 1 and "b64" in value:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise invalid("Unable to base64 decode") from None
        raise _type_error(value, dtype)
    if dtype == tf.bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, dtype)
    if dtype.is_floating:
        if isinstance(value, int) and abs(value) > np.finfo(dtype.as_numpy_dtype).max:
            raise _type_error(value, dtype)
        return value
    if not isinstance(value, int):
        raise _type_error(value, dtype)
    info = np.iinfo(dtype.as_numpy_dtype)
    if not info.min <= value <= info.max:
        raise _type_error(value, dtype)
    return value


def _is_value(obj) -> bool:
    """A plain value, list or {"b64": ...} object (not an object of named inputs)."""
    return not isinstance(obj, dict) or (len(obj) == 1 and "b64" in obj)


def _shape_of(value) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def json_to_numpy(value, dtype: tf.DType, exact: bool = False) -> np.ndarray:
    """Converts a (nested list of) JSON values to an array of `dtype`.

    The shape comes from following the first element at each level; every list must have
    that length (TF Serving's GetDenseTensorShape + FillTensorProto). With `exact`, every
    value is checked on its own (numpy's fast parser would take true for 1).
    """
    shape = _shape_of(value)
    np_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
    if not exact and dtype != tf.string and shape and shape[-1] > 0:
        fast = _fast_numeric(value, shape, dtype)
        if fast is not None:
            return fast
    flat: list = []

    def walk(v, level):
        if level == len(shape):
            if isinstance(v, list):
                raise invalid(f"Encountered list at unexpected size: {v!r:.64} at level {level}")
            flat.append(_scalar(v, dtype))
            return
        if not isinstance(v, list):
            raise invalid(
                f"Encountered scalar element: {json.dumps(v)[:64]} found at incorrect level: "
                f"{level}"
            )
        if len(v) != shape[level]:
            raise invalid(
                f"Encountered list at unexpected size: {len(v)} at level: {level} "
                f"expected size: {shape[level]}"
            )
        for item in v:
            walk(item, level + 1)

    walk(value, 0)
    array = np.empty(len(flat), dtype=np_dtype)
    if flat:
        array[:] = flat
    return array.reshape(shape)


def _fast_numeric(value, shape: list[int], dtype: tf.DType) -> np.ndarray | None:
    """numpy's parser for the common well-formed case; None means "check slowly"."""
    try:
        array = np.array(value)
    except (ValueError, OverflowError):  # ragged lists, integers beyond 64 bits
        return None
    if list(array.shape) != shape:
        return None
    kind = array.dtype.kind
    ok = (kind == "i" and (dtype.is_integer or dtype.is_floating)) or (
        kind == "f" and dtype.is_floating
    )
    if dtype == tf.bool:
        ok = kind == "b"
    if not ok:
        return None
    if dtype.is_integer:
        info = np.iinfo(dtype.as_numpy_dtype)
        if array.size and (array.min() < min(info.min, 0) or array.max() > info.max):
            return None
    return array.astype(dtype.as_numpy_dtype)


def request_inputs(body: dict, signature, exact: bool = False) -> tuple[dict, bool]:
    """Builds input arrays from a :predict body; returns (inputs, row_format).

    Args:
      body: the parsed JSON object.
      signature: the SignatureInfo whose inputs give names and dtypes.
      exact: check every value on its own (see json_to_numpy).

    Raises:
      ServingError: INVALID_ARGUMENT with TF Serving's messages.
    """
    has_instances, has_inputs = "instances" in body, "inputs" in body
    if has_instances and has_inputs:
        raise invalid(
            f"JSON Value: {json.dumps(body)[:256]} Not formatted correctly expecting only "
            "one of 'inputs' or 'instances' keys to exist"
        )
    if not has_instances and not has_inputs:
        raise invalid("Missing 'inputs' or 'instances' key")
    specs = signature.inputs
    if has_inputs:
        data = body["inputs"]
        if _is_value(data):
            if len(specs) != 1:
                raise invalid(
                    "inputs is a plain value/list, but expecting an object as multiple input "
                    "tensors required as per tensorinfo_map"
                )
            ((name, spec),) = specs.items()
            return {name: json_to_numpy(data, spec.dtype, exact)}, False
        out = {}
        for name, spec in specs.items():
            if name not in data:
                raise invalid(f"Missing named input: {name} in 'inputs' object.")
            out[name] = json_to_numpy(data[name], spec.dtype, exact)
        return out, False

    instances = body["instances"]
    if not isinstance(instances, list):
        raise invalid("Expecting 'instances' to be an list/array")
    if not instances:
        raise invalid("No values in 'instances' array")
    named = not _is_value(instances[0])
    if not named and len(specs) != 1:
        raise invalid(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    columns: dict[str, list] = {name: [] for name in specs}
    for i, item in enumerate(instances):
        if named != (not _is_value(item)):
            raise invalid(
                f"Failed to process element: {i} of 'instances' list. Error: "
                "INVALID_ARGUMENT: Expecting all elements to be objects or all plain values"
            )
        if named:
            if set(item) != set(specs):
                raise invalid(
                    f"Failed to process element: {i} of 'instances' list. JSON object: "
                    f"{json.dumps(item)[:256]} keys: {sorted(item)} do not match expected "
                    f"input keys: {sorted(specs)}"
                )
            for name in specs:
                columns[name].append(item[name])
        else:
            columns[next(iter(specs))].append(item)
    out = {}
    for name, values in columns.items():
        out[name] = _stack_instances(values, name if named else None, specs[name].dtype, exact)
    return out, True


def _stack_instances(values: list, key: str | None, dtype: tf.DType, exact: bool) -> np.ndarray:
    try:
        batch = json_to_numpy(values, dtype, exact)
    except Exception as e:
        if not hasattr(e, "code"):
            raise
        # Locate the element for TF Serving's per-element message.
        expected = None
        for i, v in enumerate(values):
            label = f"key: {key} " if key else ""
            try:
                element = json_to_numpy(v, dtype, exact)
            except Exception as inner:
                if not hasattr(inner, "code"):
                    raise
                raise invalid(
                    f"Failed to process element: {i} {label}of 'instances' list. Error: "
                    f"INVALID_ARGUMENT: {inner.message}"
                ) from None
            if expected is None:
                expected = element.shape
            elif element.shape != expected:
                if element.size != math.prod(expected):
                    raise invalid(
                        f"Expecting tensor size: {math.prod(expected)} but got: {element.size}"
                    ) from None
                raise invalid(
                    f"Expecting shape {list(expected)} but got: {list(element.shape)}"
                ) from None
        raise
    return batch


# ----------------------------------------------------------------------------- JSON out


def format_float(value: float, double: bool = False) -> str:
    """TF Serving's WriteDecimal: %g, or %.9g / %.17g when %g does not round-trip."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = f"{value:g}"
    if double:
        if float(text) != value:
            text = f"{value:.17g}"
    elif np.float32(float(text)) != np.float32(value):
        text = f"{value:.9g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def format_floats(array: np.ndarray) -> list[str]:
    """format_float of every value of a float array, in order (the common case vectorised:
    %g for all, parsed back by numpy; only values %g does not round-trip are redone)."""
    flat = array.ravel()
    double = flat.dtype == np.float64
    if not np.isfinite(flat).all():
        return [format_float(v, double) for v in flat.tolist()]
    values = flat.astype(np.float64).tolist()
    texts = list(map("{:g}".format, values))
    back = np.array(texts, dtype=np.float64)
    if double:
        wrong = np.flatnonzero(back != flat)
        precise = "{:.17g}"
    else:
        wrong = np.flatnonzero(back.astype(np.float32) != flat.astype(np.float32))
        precise = "{:.9g}"
    for i in wrong.tolist():
        texts[i] = precise.format(values[i])
    return [t if ("." in t or "e" in t) else t + ".0" for t in texts]


def _json_items(array: np.ndarray, alias: str) -> list[str]:
    """The JSON text of each value of a tensor, flattened, with TF Serving's formatting."""
    kind = array.dtype.kind
    if kind == "f":
        return format_floats(array)
    if kind in "iu":
        return [str(v) for v in array.ravel().tolist()]
    if kind == "b":
        return ["true" if v else "false" for v in array.ravel().tolist()]
    as_b64 = alias.endswith("_bytes")
    items = []
    for v in array.ravel().tolist():
        raw = v if isinstance(v, bytes) else str(v).encode()
        if as_b64:
            items.append('{"b64": "' + base64.b64encode(raw).decode() + '"}')
        else:
            items.append(json.dumps(raw.decode("utf-8", errors="replace")))
    return items


def _json_values(array: np.ndarray, alias: str) -> str:
    """JSON text of a tensor (nested lists) with TF Serving's scalar formatting."""
    return _nest(_json_items(array, alias), list(array.shape))


def _json_rows(array: np.ndarray, alias: str) -> list[str]:
    """JSON text of each row (first dimension) of a tensor, formatted in one pass."""
    items = _json_items(array, alias)
    shape = list(array.shape[1:])
    step = math.prod(shape)
    return [_nest(items[i * step : (i + 1) * step], shape) for i in range(array.shape[0])]


def _nest(items: list[str], shape: list[int]) -> str:
    if not shape:
        return items[0]
    if len(shape) == 1:
        return "[" + ", ".join(items) + "]"
    step = math.prod(shape[1:])
    return (
        "["
        + ", ".join(_nest(items[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0]))
        + "]"
    )


def predict_response_json(outputs: dict[str, np.ndarray], row_format: bool) -> str:
    """{"predictions": ...} (row) or {"outputs": ...} (columnar) as TF Serving writes them."""
    if not row_format:
        if len(outputs) == 1:
            ((alias, value),) = outputs.items()
            return '{\n    "outputs": ' + _json_values(value, alias) + "\n}"
        parts = [f'"{k}": {_json_values(v, k)}' for k, v in outputs.items()]
        return '{\n    "outputs": {\n        ' + ",\n        ".join(parts) + "\n    }\n}"
    batch = None
    for alias, value in outputs.items():
        if value.ndim == 0:
            raise invalid(f"Tensor name: {alias} has no shape information ")
        if batch is None:
            batch = value.shape[0]
        elif value.shape[0] != batch:
            raise invalid(
                f"Tensor name: {alias} has inconsistent batch size: {value.shape[0]} "
                f"expecting: {batch}"
            )
    if len(outputs) == 1:
        ((alias, value),) = outputs.items()
        rows = _json_rows(value, alias)
    else:
        columns = {k: _json_rows(v, k) for k, v in outputs.items()}
        rows = [
            "{" + ", ".join(f'"{k}": {column[i]}' for k, column in columns.items()) + "}"
            for i in range(batch or 0)
        ]
    return '{\n    "predictions": [' + ", ".join(rows) + "\n    ]\n}"


# ----------------------------------------------------------------------------- fast path
# A :predict body of raw pixels is ~95% numbers. Parsed as nested JSON lists it costs a
# Python object per number (JSON-bound: a few % of the model's speed); here the numbers of
# {"instances"|"inputs": <regular numeric array>} are parsed as one flat list by orjson,
# after the array's bracket structure is checked to be exactly that of its shape. Anything
# else (strings, booleans, ragged arrays, several inputs) takes the general path.

_NUMBER_BYTES = b"0123456789+-.eE"
_BLANKS = b" \t\r\n"


@dataclasses.dataclass
class NumericBody:
    """A body split into its small part (parsed) and its one big numeric array (not)."""

    request: dict  # the body with the array replaced by 0
    key: str  # "instances" or "inputs"
    array: bytes  # the array's JSON text


def split_numeric_body(body: bytes) -> NumericBody | None:
    """The body's one big array apart from the rest, or None when it is not that simple."""
    import orjson

    keys = [k for k in ("instances", "inputs") if body.find(f'"{k}"'.encode()) >= 0]
    if len(keys) != 1:
        return None
    key = keys[0]
    at = body.find(f'"{key}"'.encode()) + len(key) + 2
    start = body.find(b"[", at)
    if start < 0 or body[at:start].strip(_BLANKS) != b":":
        return None
    brackets = np.frombuffer(body, np.uint8)[start:]
    depth = np.cumsum((brackets == ord("[")).astype(np.int32) - (brackets == ord("]")))
    closed = np.flatnonzero(depth == 0)
    if not len(closed):
        return None
    end = start + int(closed[0]) + 1
    array = body[start:end]
    if b'"' in array:
        return None
    try:
        request = orjson.loads(body[:start] + b"0" + body[end:])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict) or request.get(key) != 0:
        return None
    return NumericBody(request, key, array)


def _structure_shape(structure: bytes) -> list[int] | None:
    """The shape of a nested array from its brackets and commas (numbers removed; no
    empty lists), following the first element at each level; None if malformed."""
    rank = len(structure) - len(structure.lstrip(b"["))
    if rank == 0:
        return None
    chars = np.frombuffer(structure, np.uint8)
    depth = np.cumsum((chars == ord("[")).astype(np.int32) - (chars == ord("]")))
    shape = []
    for d in range(1, rank + 1):
        start = d - 1  # the first list at depth d opens at the (d-1)-th byte
        ends = np.flatnonzero(depth[start:] < d)
        if not len(ends):
            return None
        end = start + int(ends[0])
        inside = slice(start, end)
        commas = int(np.count_nonzero((chars[inside] == ord(",")) & (depth[inside] == d)))
        shape.append(commas + 1)  # the caller ruled out empty lists
    return shape


def _expected_structure(shape: list[int]) -> bytes:
    text = b"[" + b"," * max(shape[-1] - 1, 0) + b"]"
    for size in reversed(shape[:-1]):
        text = b"[" + b",".join([text] * size) + b"]"
    return text


def numeric_inputs(split: NumericBody, signature) -> dict[str, np.ndarray] | None:
    """The one numeric input of `signature` from a split body, or None (general path)."""
    import orjson

    if len(signature.inputs) != 1:
        return None
    ((name, spec),) = signature.inputs.items()
    dtype = spec.dtype
    if dtype in (tf.string, tf.bool) or not (dtype.is_integer or dtype.is_floating):
        return None
    if b"[]" in split.array.translate(None, _BLANKS):
        return None  # an empty list: the general path answers for it
    structure = split.array.translate(None, _NUMBER_BYTES + _BLANKS)
    shape = _structure_shape(structure)
    if not shape or 0 in shape or structure != _expected_structure(shape):
        return None
    try:
        values = np.array(orjson.loads(b"[" + split.array.translate(None, b"[]") + b"]"))
    except (orjson.JSONDecodeError, ValueError, OverflowError):
        return None
    if values.size != math.prod(shape) or values.dtype.kind not in "if":
        return None
    if dtype.is_integer:
        info = np.iinfo(dtype.as_numpy_dtype)
        if values.dtype.kind != "i" or values.min() < info.min or values.max() > info.max:
            return None  # the general path words the error as TF Serving does
    return {name: values.reshape(shape).astype(dtype.as_numpy_dtype)}
