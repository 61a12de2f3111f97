"""Decoder LMs (Llama, Mistral, Qwen2, Gemma shapes from one config) and Hugging Face interop."""
from models._config import PRESETS, REMAT_POLICIES, DecoderConfig, preset
from models._decoder import Cache, Decoder
from models._hf import config_from_hf, config_to_hf, is_classifier, load_hf, read_tensor, save_hf, score_position
