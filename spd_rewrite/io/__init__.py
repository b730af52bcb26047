"""Model input and output: model specs, weights files and the saved-folder format."""

from spd_rewrite.io.checkpoint import apply_state_dict, read_state_dict, write_state_dict
from spd_rewrite.io.saved_folder import FORMAT_VERSION, load, read_manifest, save
from spd_rewrite.io.spec import load_model

__all__ = [
    "FORMAT_VERSION",
    "apply_state_dict",
    "load",
    "load_model",
    "read_manifest",
    "read_state_dict",
    "save",
    "write_state_dict",
]
