"""The one SGLang release kvbuffer is built and tested against (its internals change between releases)."""

SGLANG_VERSION = "0.5.17"
