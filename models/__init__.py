"""Decoder LMs (Llama, Mistral, Qwen2, Gemma shapes from one config) and Hugging Face interop."""
from models._config import PRESETS, DecoderConfig, preset
from models._decoder import Cache, Decoder
