"""Families no command converts, recognised by name so that each refusal says why."""

from __future__ import annotations

from ..spec import ModelSpec
from . import register
from .base import Family
from .minicpm import MiniCPM

FATRELU = "MiniCPM-S's FATReLU activation has no Llama or llama.cpp equivalent"


@register
class MiniCPMS(MiniCPM):
    """MiniCPM-S-1B: MiniCPM-1B's shape with FATReLU (the gate kept only where it exceeds a
    threshold), which neither transformers' Llama nor llama.cpp computes. Parsed like MiniCPM so
    that `inspect` shows it."""

    name = "minicpm-s"
    title = "MiniCPM-S (FATReLU)"
    examples = "MiniCPM-S-1B"
    gguf_archs = ()
    refused = FATRELU

    def matches(self, cfg: dict) -> bool:
        return cfg.get("model_type") == "minicpm" and cfg.get("hidden_act") == "fatrelu"

    def variant(self, spec: ModelSpec) -> str:
        return self.name

    def refusal(self, spec: ModelSpec, command: str) -> str | None:
        return FATRELU if command != "verify" else f"{FATRELU} (the reference forward pass has none either)"

    def support(self, command: str) -> str:
        return "refused" if command != "to-llama" else f"refused: {FATRELU}"


class RefusedByConfig:
    """A family recognised only to refuse it: its config is not parsed (it is not Llama-shaped),
    every command says what it is and why, and inspect shows the same line."""

    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()  # substrings of config.json `architectures`

    def matches(self, cfg: dict) -> bool:
        archs = " ".join(cfg.get("architectures") or [])
        return cfg.get("model_type") in self.model_types or any(a in archs for a in self.architectures)

    def parse(self, cfg: dict, where: str):
        from ..errors import ConvertError
        raise ConvertError(f"{where}: {self.title} is not supported by any command: {self.refused}")

    def support(self, command: str) -> str:
        return "refused" if command != "to-llama" else f"refused: {self.refused}"


@register
class MiniCPMSALA(RefusedByConfig, Family):
    name = "minicpm-sala"
    title = "MiniCPM-SALA (sparse + linear hybrid attention)"
    examples = "MiniCPM-SALA"
    model_types = ("minicpm_sala",)
    refused = ("its layers mix sparse (InfLLM-v2) and linear (Lightning) attention, which neither a Llama "
               "checkpoint nor llama.cpp can express")


@register
class SpeculativeDraft(RefusedByConfig, Family):
    name = "dspark-draft"
    title = "DSpark / EAGLE speculative-decoding drafts"
    examples = "MiniCPM DSpark and EAGLE draft heads"
    model_types = ("minicpm_eagle", "minicpm_dspark", "dspark", "eagle")
    architectures = ("DSpark", "Eagle", "EAGLE", "Draft")
    refused = ("a draft head predicts from its target model's hidden states and is not a model of its own; "
               "convert the target model (MiniCPM4.1 and MiniCPM5 are supported)")


@register
class MiniCPMV(RefusedByConfig, Family):
    name = "minicpm-v"
    title = "MiniCPM-V 4.x (vision-language)"
    examples = "MiniCPM-V 4.0, 4.5, 4.6"
    model_types = ("minicpmv", "minicpmv4_6", "minicpmv4_7", "minicpm_ocr", "minicpmo")
    architectures = ("MiniCPMV", "MiniCPMO")
    refused = ("its text tower is not a MiniCPM (MiniCPM-V 4.6's is Qwen3.5) and its vision tower has no place in "
               "these formats; llama.cpp's own convert_hf_to_gguf.py converts MiniCPM-V 4.6 (text model and mmproj)")
