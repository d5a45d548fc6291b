"""The `general.*` keys of a GGUF as llama.cpp's converter writes them, and its default file name.

llama.cpp's `convert_hf_to_gguf.py` fills them with gguf-py's `Metadata.load`: the model card's
front matter (README.md), config.json's `_name_or_path`, the folder name, generation_config.json,
an override file (`--metadata`) and `--model-name`. We call the same function with the same
inputs, so a file gets the keys (and, written into a folder, the name) llama.cpp would give it
(openbmb/MiniCPM-2B-sft-bf16's config.json says `_name_or_path: openbmb/CPM-2B`: `CPM-2B-Q4_K_M.gguf`).
Two things we do ourselves:

- the `general.sampling.*` keys, with the mapping of llama.cpp's converter (generation_config's
  `temperature` -> `general.sampling.temp`, `repetition_penalty` -> `penalty_repeat`, ...): the
  gguf package on PyPI lacks them in 0.17 and maps no `repetition_penalty` in 0.19, so the file's
  bytes would depend on the installed gguf;
- a Hub source (a repo id, or a folder in the Hugging Face cache) is named by its repo id, as the
  converter names a `--remote` model, and its address is `general.source.repo_url`.

Values the converter would crash on (a number where the card must give text, a tag that is not
text, an unreadable front matter or override file) are refused with one line naming the file.
"""

from __future__ import annotations

import json
import logging
from math import prod
from pathlib import Path
from typing import Any, Iterable

import gguf

from ...errors import ConvertError
from .plan import FileType

# (key, generation_config.json keys, value type): gguf-py's Metadata.load as llama.cpp vendors it
SAMPLING = [
    ("general.sampling.sequence", ("sequence",), str),
    ("general.sampling.top_k", ("top_k",), int),
    ("general.sampling.top_p", ("top_p",), float),
    ("general.sampling.min_p", ("min_p",), float),
    ("general.sampling.xtc_probability", ("xtc_probability",), float),
    ("general.sampling.xtc_threshold", ("xtc_threshold",), float),
    ("general.sampling.temp", ("temperature",), float),
    ("general.sampling.penalty_last_n", ("penalty_last_n",), int),
    ("general.sampling.penalty_repeat", ("penalty_repeat", "repetition_penalty"), float),
    ("general.sampling.mirostat", ("mirostat",), int),
    ("general.sampling.mirostat_tau", ("mirostat_tau",), float),
    ("general.sampling.mirostat_eta", ("mirostat_eta",), float),
]
# Metadata attributes written as text, as lists of text, as lists of {field: text}
_TEXT = ("name", "author", "version", "organization", "finetune", "basename", "description", "quantized_by",
         "size_label", "license_name", "license_link", "url", "doi", "uuid", "repo_url", "source_url", "source_doi",
         "source_uuid", "source_repo_url")
_LISTS = ("tags", "languages")
_ENTRIES = ("base_models", "datasets")


class GeneralMetadata:
    """What goes into a file's `general.*` keys: gguf-py's Metadata and the sampling values."""

    def __init__(self, meta: gguf.Metadata, sampling: list[tuple[str, Any]]):
        self.meta = meta
        self.sampling = sampling  # (key, value) in the converter's order, only those given

    def write(self, w: gguf.GGUFWriter) -> None:
        """general.type and the rest, in the converter's order (general.architecture is the writer's)."""
        w.add_type("model")
        for key, value in self.sampling:
            kind = next(k for name, _, k in SAMPLING if name == key)
            if kind is str:
                w.add_string(key, value)
            elif kind is int:
                w.add_int32(key, value)
            else:
                w.add_float32(key, float(value))
        self.meta.set_gguf_meta_model(w)


def parameter_counts(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) over GGUF tensors, as gguf-py's writer counts them."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape in tensors:
        size = prod(shape)
        total += size
        if "_exps." in name and len(shape) >= 3:
            expert += size // shape[0]  # rows-major shape: [n_expert, rows, cols]
            expert_sum += shape[0]
            n_expert_tensors += 1
        else:
            shared += size
    count = expert_sum // n_expert_tensors if n_expert_tensors else 0
    return total, shared, expert, count


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path}: the {what} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: the {what} must be a JSON object of GGUF keys, e.g. "
                           '{"general.quantized_by": "your name"}')
    return data


def _generation_config(folder: Path) -> dict:
    """generation_config.json as the converter reads it: unreadable or not an object counts as absent."""
    try:
        data = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _pick(d: dict, keys: Iterable[str], default=None):
    """d.get(k0, d.get(k1, ... default)): the first key present wins, even with a null value."""
    for k in keys:
        if k in d:
            return d[k]
    return default


def sampling_values(folder: Path, override: dict, override_path: Path | None) -> list[tuple[str, Any]]:
    """The `general.sampling.*` values: the override file's, else generation_config.json's."""
    gen = _generation_config(folder)
    out = []
    for key, gen_keys, kind in SAMPLING:
        found = [k for k in gen_keys if k in gen]
        value = _pick(override, [key], _pick(gen, gen_keys))
        if value is None:
            continue
        where = (f"{override_path}: '{key}'" if key in override
                 else f"{folder / 'generation_config.json'}: '{found[0]}'")
        ok = (isinstance(value, str) if kind is str else
              isinstance(value, int) and not isinstance(value, bool) and -2**31 <= value < 2**31 if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            want = {str: "text", int: "a 32-bit integer", float: "a number"}[kind]
            raise ConvertError(f"{where} must be {want}, got {value!r}")
        out.append((key, value))
    return out


def _load(override_path: Path | None, folder: Path, model_name: str | None, total: int) -> gguf.Metadata:
    import yaml

    logging.getLogger("metadata").setLevel(logging.ERROR)  # gguf-py logs a front matter it ignores
    try:
        return gguf.Metadata.load(override_path, folder, model_name, total)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConvertError(f"{folder / 'README.md'}: cannot read the model card's front matter "
                           f"({str(exc).splitlines()[0][:120]})") from None


def _check_values(meta: gguf.Metadata, override: dict, override_path: Path | None, folder: Path) -> None:
    """Refuse, naming the file, what gguf-py would crash on or write in a form llama.cpp misreads."""
    def where(attr: str) -> str:
        key = {"languages": "general.languages", "tags": "general.tags", "base_models": "general.base_models",
               "datasets": "general.datasets"}.get(attr, f"general.{attr}")
        return f"{override_path}: '{key}'" if key in override else f"{folder / 'README.md'}: '{attr}'"

    for attr in _TEXT:
        value = getattr(meta, attr, None)
        if value is not None and not isinstance(value, str):
            raise ConvertError(f"{where(attr)} must be text, got {value!r}")
    lic = meta.license
    if lic is not None and not (isinstance(lic, str) or isinstance(lic, list) and all(isinstance(x, str) for x in lic)):
        raise ConvertError(f"{where('license')} must be text or a list of text, got {lic!r}")
    for attr in _LISTS:
        value = getattr(meta, attr, None)
        if value is not None and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise ConvertError(f"{where(attr)} must be a list of text, got {value!r}")
    for attr in _ENTRIES:
        for entry in getattr(meta, attr, None) or []:
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ConvertError(f"{where(attr)}: each entry must be a model id or a mapping of text, got {entry!r}")


def general_metadata(folder: Path, tensors: Iterable[tuple[str, tuple[int, ...]]], *, repo_id: str | None = None,
                     override_path: Path | None = None, model_name: str | None = None) -> GeneralMetadata:
    """The converter's metadata for the checkpoint in `folder` whose GGUF holds `tensors`.

    `repo_id`: the Hub repo the checkpoint came from (None: a local folder); `override_path`: a
    file of GGUF keys as the converter's --metadata takes; `model_name`: its --model-name."""
    total, shared, expert, count = parameter_counts(tensors)
    override = _read_json(override_path, "metadata file") if override_path is not None else {}
    meta = _load(override_path, Path(folder), model_name, total)
    for key, _, _ in SAMPLING:  # written from sampling_values (see the module's docstring)
        setattr(meta, key.replace("general.sampling.", "sampling_"), None)
    if repo_id is not None and model_name is None:
        meta.name = repo_id  # the converter's --remote
        if meta.source_repo_url is None:
            meta.source_repo_url = f"https://huggingface.co/{repo_id}"
    if meta.name is None:
        meta.name = Path(folder).name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    _check_values(meta, override, override_path, Path(folder))
    return GeneralMetadata(meta, sampling_values(Path(folder), override, override_path))


def output_type(ft: FileType) -> str:
    """'Q4_K_M' for LlamaFileType.MOSTLY_Q4_K_M, 'F32' for ALL_F32 (llama.cpp's spelling)."""
    return ft.ftype.name.partition("_")[2]


def default_file_name(general: GeneralMetadata, ft: FileType) -> str:
    meta = general.meta
    return gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label,
                                  output_type(ft)) + ".gguf"
