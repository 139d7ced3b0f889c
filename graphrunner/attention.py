"""Attention backends beyond SDPA for the built-in decoder: flash-attn 4 (flash_attn.cute) and flash-attn 2."""
from __future__ import annotations

EXTRAS = {"flash-attn-4": ("flash_attn.cute", "pip install .[flash-attn-4]"),
          "flash-attn": ("flash_attn", "pip install .[flash-attn]")}


def flash_attention_backend(name: str):
    module, extra = EXTRAS[name]
    try:
        __import__(module)
    except ImportError as exc:
        raise ImportError(f"attention backend {name!r} needs the package that provides {module}: {extra}") from exc
    raise NotImplementedError(f"attention backend {name!r} is not wired into the built-in decoder yet; "
                              "use attention='sdpa'")
