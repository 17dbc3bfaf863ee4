"""A compressed model's directory made loadable where vtrans is not installed (`trust_remote_code=True`).

config.json gets model_type "vtrans", so a plain `from_pretrained(DIR)` stops with transformers' own error asking
for `trust_remote_code=True` rather than loading the dense architecture with random weights in place of the cut
ones; its `auto_map` names the classes in modeling_vtrans.py. That file is one source for every family
(vtrans/deploy/modeling_vtrans.py, the code `vtrans.load` uses too), followed by two classes that name the dense
architecture and resize it on construction. The "vtrans" entry keeps the dense model_type and architecture, so
`vtrans.load` rebuilds the model from JSON and safetensors alone, without running the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

from vtrans.deploy import modeling_vtrans

MODEL_TYPE = "vtrans"
MODULE = "modeling_vtrans"

# The Auto class that loads each kind of architecture, most specific first.
AUTO_CLASSES = (
    ("AutoModelForSequenceClassification", modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    ("AutoModelForCausalLM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ("AutoModelForImageClassification", modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
    ("AutoModel", modeling_auto.MODEL_MAPPING_NAMES),
)

CLASSES = '''

# -- written by vtrans for this model: its dense architecture, resized to the kept sizes on construction --------
from transformers import AutoModel, {config_class}, {architecture}, {base_class}  # noqa: E402


class VTransConfig({config_class}):
    model_type = "{model_type}"


class VTrans{architecture}(Resized, {architecture}):
    config_class = VTransConfig
'''

# Some task models build their base model through AutoModel (LLaMA's sequence classifier): it must know the config.
BASE_CLASS = '''

class VTrans{base_class}({base_class}):
    config_class = VTransConfig


AutoModel.register(VTransConfig, VTrans{base_class}, exist_ok=True)
'''


def auto_class_for(architecture: str) -> str:
    for auto_class, names in AUTO_CLASSES:
        if architecture in names.values():
            return auto_class
    raise ValueError(f"no Auto class loads {architecture}")


def write(directory: Path, config) -> None:
    """Turn the saved dense-architecture config.json in `directory` into a vtrans one and write the code."""
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    architecture = saved["architectures"][0]
    saved["vtrans"] |= {"model_type": saved["model_type"], "architecture": architecture}
    saved["model_type"] = MODEL_TYPE
    saved["architectures"] = [f"VTrans{architecture}"]
    saved["auto_map"] = {
        "AutoConfig": f"{MODULE}.VTransConfig",
        auto_class_for(architecture): f"{MODULE}.VTrans{architecture}",
    }
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    names = {
        "config_class": type(config).__name__,
        "architecture": architecture,
        "base_class": modeling_auto.MODEL_MAPPING_NAMES[config.model_type],
        "model_type": MODEL_TYPE,
    }
    classes = CLASSES.format(**names)
    if names["base_class"] != architecture:
        classes += BASE_CLASS.format(**names)
    source = Path(modeling_vtrans.__file__).read_text()
    (directory / f"{MODULE}.py").write_text(source + classes)


def is_compressed(directory: str | Path) -> bool:
    """Whether `directory` holds a model vtrans compressed (its config has a "vtrans" entry; written by `write`,
    or by a vtrans from before it)."""
    path = Path(directory) / "config.json"
    return path.is_file() and "vtrans" in json.loads(path.read_text())


def dense_config(directory: str | Path):
    """The dense architecture's config from a directory's config.json, a compressed one's read as JSON (its
    modeling code is not run): its "vtrans" entry says what it keeps."""
    saved = json.loads((Path(directory) / "config.json").read_text())
    if saved.get("model_type") == MODEL_TYPE:
        saved = {key: value for key, value in saved.items() if key != "auto_map"} | {
            "model_type": saved["vtrans"]["model_type"],
            "architectures": [saved["vtrans"]["architecture"]],
        }
    return CONFIG_MAPPING[saved["model_type"]].from_dict(saved)
