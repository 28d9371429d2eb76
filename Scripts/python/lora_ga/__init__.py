"""lora_ga — the PyTorch side of lora-ga.

torch and PEFT are imported lazily: importing this package needs neither.
"""

# name → module that defines it; loaded on first use (module-level __getattr__, PEP 562).
_LAZY = {
    "GradientRecorder": "recorder",
    "collect_gradients": "recorder",
    "write_safetensors": "recorder",
    "attach": "attach",
    "save_converted": "attach",
    "Attachment": "attach",
    "convert_directories": "convert",
    "AdapterError": "peft_safetensors",
    "read_adapter": "peft_safetensors",
    "write_adapter": "peft_safetensors",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_ga' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
