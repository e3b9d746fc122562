"""`open_target(url)`: the client for a target URL, chosen by its scheme.

grpc://host:port/<model>[/versions/N|/labels/L]     TF Serving gRPC (tensor_content)
http(s)://host:port/v1/models/<model>[...]          TF Serving REST (b64 PNG or instances)
savedmodel:/path/to/export                          in-process, for offline work
json+http(s)://host:port/<path>                     generic JSON-over-HTTP cloud API
"""

from __future__ import annotations

import importlib

from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import Target

# URL prefix -> (module, class); the longest matching prefix wins ("json+http" before
# "http"). Clients are imported on use: a gRPC steal never loads the HTTP stack.
SCHEMES = {
    "grpc://": ("copycat_tf.targets.tfserving_grpc", "GrpcTarget"),
    "json+http://": ("copycat_tf.targets.http_json", "JsonHttpTarget"),
    "json+https://": ("copycat_tf.targets.http_json", "JsonHttpTarget"),
    "http://": ("copycat_tf.targets.tfserving_rest", "RestTarget"),
    "https://": ("copycat_tf.targets.tfserving_rest", "RestTarget"),
    "savedmodel:": ("copycat_tf.targets.saved_model", "SavedModelTarget"),
}


def open_target(url: str, **options) -> Target:
    """A client for the target URL (see module docstring).

    Args:
      url: the target URL.
      **options: client options; each client takes the ones in its OPTIONS (the generic
        JSON client needs its request template, response field and input shape), the
        others and None values are ignored.

    Raises:
      UserInputError: unknown scheme or malformed URL.
    """
    matches = [prefix for prefix in SCHEMES if url.startswith(prefix)]
    if not matches:
        raise UserInputError(
            f"target URL {url!r} has an unknown scheme; expected grpc://host:port/<model>, "
            "http(s)://host:port/v1/models/<model>, savedmodel:<path> or json+http(s)://..."
        )
    module, name = SCHEMES[max(matches, key=len)]
    client = getattr(importlib.import_module(module), name)
    return client(
        url, **{k: v for k, v in options.items() if k in client.OPTIONS and v is not None}
    )
