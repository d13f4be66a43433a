"""What evaluation compares: the base model the config describes and the fine-tuned one, and their tokenizer.

The fine-tuned model is a PEFT adapter folder (a run's output_dir or one of its checkpoint-<step>
folders) loaded onto the rebuilt base, or a merged model folder. Anything wrong with the folder
(missing, not a model, corrupt, trained for another model) is a UserError that says what to do.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from moetune.config.schema import Config
from moetune.errors import UserError, first_line
from moetune.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_MODEL_WEIGHTS, MODEL_CONFIG, latest_checkpoint


@dataclass(frozen=True)
class TunedModelPath:
    """A folder holding a fine-tuned model: a PEFT ``adapter``, a ``merged`` full model, or the ``esft``
    experts (:mod:`moetune.models.trainable.esft`)."""

    path: Path
    kind: Literal["adapter", "merged", "esft"]


def resolve_tuned_model(config: Config, adapter_path: str | Path | None) -> TunedModelPath:
    """The folder to evaluate: ``adapter_path``, or the final adapter in ``training.output_dir``."""
    path = Path(adapter_path) if adapter_path is not None else Path(config.training.output_dir)
    given = "--adapter-path" if adapter_path is not None else "training.output_dir"
    if not path.is_dir():
        raise UserError(f"{given} {path} is not a directory. Train first (`moetune train`) or pass --adapter-path "
                        "with a run's output_dir, one of its checkpoint-<step> folders, or a merged model folder.")
    if (path / ADAPTER_CONFIG).is_file():
        _check_adapter_config(path / ADAPTER_CONFIG)
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
            raise UserError(f"{path} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); "
                            "the save was interrupted. Evaluate another checkpoint.")
        return TunedModelPath(path, "adapter")
    from moetune.models.trainable.esft import is_esft_folder

    if is_esft_folder(path):
        return TunedModelPath(path, "esft")
    if (path / MODEL_CONFIG).is_file() and (any(path.glob(FULL_MODEL_WEIGHTS)) or any(path.glob("pytorch_model*.bin"))):
        return TunedModelPath(path, "merged")
    latest = latest_checkpoint(path)
    hint = f" It holds checkpoints; the run has not finished: pass --adapter-path {latest}." if latest else ""
    raise UserError(f"{given} {path} holds neither a PEFT adapter ({ADAPTER_CONFIG}) nor a merged model "
                    f"(config.json + model*.safetensors).{hint}")


def _check_adapter_config(file: Path) -> None:
    """A UserError naming ``file`` unless PEFT can read it (valid JSON of the shape of a PEFT config)."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is corrupt ({err}); evaluate another checkpoint.") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a PEFT adapter config: it holds a JSON {type(data).__name__}, not an object "
                        "of settings; evaluate another checkpoint.")
    for key, value in data.items():
        if key in _NAME_LIST_FIELDS and not _is_names(value, allow_str=key in _NAME_OR_LIST_FIELDS):
            raise UserError(f"{file}: \"{key}\" must be a list of module names (or null), got {json.dumps(value)}; "
                            "evaluate another checkpoint.")
        if key in _NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{file}: \"{key}\" must be a number, got {json.dumps(value)}; evaluate another checkpoint.")
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(str(file.parent))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"{file} is not a valid PEFT adapter config ({first_line(err)}); evaluate another "
                        "checkpoint.") from None


# PEFT reads these without checking their types and fails deep inside model loading on a wrong one.
_NAME_OR_LIST_FIELDS = {"target_modules", "exclude_modules"}  # a str there is a regex
_NAME_LIST_FIELDS = _NAME_OR_LIST_FIELDS | {"modules_to_save", "target_parameters"}
_NUMBER_FIELDS = {"r", "lora_alpha", "lora_dropout"}


def _is_names(value, allow_str: bool) -> bool:
    if value is None or (allow_str and isinstance(value, str)):
        return True
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def load_eval_tokenizer(config: Config, tuned: TunedModelPath):
    """The tokenizer the model was trained with (:func:`moetune.data.tokenizer.saved_tokenizer_folder` decides)."""
    from moetune.data.tokenizer import load_run_tokenizer

    return load_run_tokenizer(config, model_dir=tuned.path)


def load_base(config: Config, tokenizer):
    """The base model exactly as training built it (same seed for random or upcycled weights), in eval mode."""
    from moetune.models.load.factory import build_base_model

    return _to_device(build_base_model(config, tokenizer, seed=config.training.seed)).eval()


def load_tuned(config: Config, tuned: TunedModelPath, tokenizer, base=None):
    """The fine-tuned model: the adapter loaded onto ``base`` (built when None), or the merged model.

    Loading an adapter changes ``base`` in place (LoRA layers are injected); evaluate the base through
    the returned model's ``disable_adapter()`` context.
    """
    if tuned.kind == "merged":
        return _load_merged(config, tuned.path, tokenizer)
    if tuned.kind == "esft":  # the selected experts written into the base: a whole model, like a merged one
        from moetune.models.trainable.esft import load_esft_artefact

        return _to_device(load_esft_artefact(base if base is not None else load_base(config, tokenizer), tuned.path)).eval()
    from peft import PeftModel
    from safetensors import SafetensorError

    from moetune.models.trainable.weights import load_trainable_weights

    base = base if base is not None else load_base(config, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base, str(tuned.path), is_trainable=False)
        except (ValueError, RuntimeError, KeyError, OSError, SafetensorError, TypeError, AttributeError) as err:
            raise UserError(f"The adapter in {tuned.path} cannot be loaded onto the base model of this config "
                            f"({first_line(err)}). Was it trained with another model.* / lora.* config, or is the file "
                            "corrupt? Pass the run's own config with --config.") from None
    missing = [w for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        raise UserError(f"The adapter in {tuned.path} does not fit the base model of this config: "
                        f"{str(missing[0].message).splitlines()[0][:300]}")
    # PEFT ignores adapter weights that match no module; loading again through the checkpoint loader
    # turns such leftovers (an adapter for another model shape) into a clear error.
    load_trainable_weights(model, tuned.path)
    return _to_device(model).eval()


def _load_merged(config: Config, path: Path, tokenizer):
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from moetune.models.load.dtypes import resolve_dtype
    from moetune.models.load.pretrained import causal_lm_class

    try:
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=config.model.trust_remote_code)
        model = causal_lm_class(hf_config).from_pretrained(str(path), config=hf_config,
                                                           dtype=resolve_dtype(config.model.torch_dtype),
                                                           trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise UserError(f"The merged model in {path} cannot be loaded ({first_line(err)}).") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"The merged model in {path} has {model.get_input_embeddings().num_embeddings} token embeddings "
                        f"but its tokenizer has {len(tokenizer)} tokens; it was saved with another tokenizer.")
    return _to_device(model).eval()


def _to_device(model):
    # Quantised (bitsandbytes) models are placed on the GPU when loaded and cannot be moved.
    if torch.cuda.is_available() and getattr(model, "hf_quantizer", None) is None:
        model = model.to("cuda")
    return model

