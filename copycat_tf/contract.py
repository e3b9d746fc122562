"""The names of the target contract (DESIGN.md, "Contracts"), defined once.

Every exported model, the model server, its defences and the attacker's clients use these
names: a target SavedModel has

  serving_default: images uint8 [N, H, W, C]  -> scores float32 [N, K], classes int64 [N]
  serving_bytes:   image_bytes string [N]     -> the same outputs

TF Serving's REST API carries inputs whose alias ends in `_bytes` as {"b64": ...}.
"""

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
INPUT_IMAGES = "images"
INPUT_IMAGE_BYTES = "image_bytes"
OUTPUT_SCORES = "scores"
OUTPUT_CLASSES = "classes"
BYTES_SUFFIX = "_bytes"
