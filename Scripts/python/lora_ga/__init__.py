"""lora_ga — the PyTorch side of lora-ga.

torch and PEFT are imported lazily: importing this package needs neither.
"""

# name → submodule that defines it; loaded on first use so importing lora_ga stays cheap.
_EXPORTS = {
    "GradientRecorder": "recorder",
    "collect_gradients": "recorder",
    "write_safetensors": "recorder",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
