"""lora_ga — the PyTorch side of lora-ga.

torch and PEFT are imported lazily: importing this package needs neither.
"""
