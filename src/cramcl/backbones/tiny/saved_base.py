"""A saved base: the tiny backbone's frozen base written to a directory once and loaded instead of trained.

The base stage is cached per vocabulary, and the vocabulary is built from the stream's own words, so every
new task list trains a new base. A saved base fixes both: its directory carries the weights *and* the
vocabulary they were trained with, so any stream whose words that vocabulary holds runs on it unchanged, the
way every benchmark runs on one pretrained MLLM. A base that is expensive to make (a long base stage) is then
paid for once by whoever makes it. ``backbone.base_path`` names the directory; ``cramcl export --format base``
writes one from a finished run.

Directory layout (all three files required)::

    base.safetensors   the TinyVLM state dict (projector + language model), float32
    tokenizer.json     the word-level vocabulary (HF ``tokenizers`` JSON)
    base.json          {"format": 1, "model": [hidden, layers, heads, ffn], "vision": "<encoder identity>",
                        "vocab_size": N, "made_by": {...}}  (made_by: how it was made, for people)
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from cramcl.backbones.tiny.tokenizer import UNK
from cramcl.config_checks import SHIPPED_BASE
from cramcl.errors import BadInputError

FORMAT = 1
FILES = ("base.safetensors", "tokenizer.json", "base.json")
MAX_LISTED = 10  # problems listed before "... and N more"
SHIPPED = SHIPPED_BASE  # ``backbone.base_path: builtin``: the base shipped in the package for the built-in stream


def shipped_base_dir() -> Path:
    """The package's saved base of the built-in stream (``cramcl/bases/builtin``; how it was made:
    docs/profiles.md, "default: base_path")."""
    return Path(__file__).resolve().parents[2] / "bases" / SHIPPED


def resolve_base_path(value: str, benchmark: str) -> str:
    """The saved base directory a run loads ("" = train the base stage). ``builtin`` is the shipped base when the
    stream is the built-in one (``benchmark`` empty) and nothing otherwise: a benchmark of one's own has its own
    words, which the shipped vocabulary does not hold, so its base is trained from its own pretrain corpus."""
    if value == SHIPPED:
        return str(shipped_base_dir()) if not benchmark else ""
    return os.path.expanduser(os.path.expandvars(value)) if value else ""


@dataclass(frozen=True)
class SavedBase:
    path: Path
    tokenizer: Tokenizer
    meta: dict
    digest: str  # of the weights file: the base's identity in run records and cache keys


def model_shape(cfg) -> list[int]:
    return [cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size]


def read_saved_base(path: str | Path) -> SavedBase:
    """Open a saved base directory and check its files (not the weights' contents: see :func:`load_weights`)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BadInputError(f"backbone.base_path: {root}: not a directory (a saved base: {', '.join(FILES)})")
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        raise BadInputError(f"{root}: not a saved base, missing {', '.join(missing)}")
    try:
        meta = json.loads((root / "base.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{root / 'base.json'}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadInputError(f"{root / 'base.json'}: format {meta.get('format') if isinstance(meta, dict) else '?'}"
                            f" is not {FORMAT} (made by another cramcl version?)")
    try:
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a plain Exception on a damaged file
        raise BadInputError(f"{root / 'tokenizer.json'}: not a tokenizers JSON file ({exc})") from None
    if tokenizer.get_vocab_size() != meta.get("vocab_size"):
        raise BadInputError(f"{root / 'tokenizer.json'}: {tokenizer.get_vocab_size()} words, base.json says "
                            f"{meta.get('vocab_size')}")
    digest = hashlib.sha1((root / "base.safetensors").read_bytes()).hexdigest()[:20]
    return SavedBase(root, tokenizer, meta, digest)


def check_compatible(saved: SavedBase, cfg, vision_identity: str) -> None:
    """The config must build the model the weights belong to."""
    problems = []
    if saved.meta.get("model") != model_shape(cfg):
        problems.append(f"{saved.path / 'base.json'}: model [hidden, layers, heads, ffn] = {saved.meta.get('model')}, "
                        f"the config asks for {model_shape(cfg)} (backbone.hidden_size, ...)")
    if saved.meta.get("vision") != vision_identity:
        problems.append(f"{saved.path / 'base.json'}: vision '{saved.meta.get('vision')}', the config gives "
                        f"'{vision_identity}' (backbone.image_size)")
    if problems:
        raise BadInputError(problems)


def check_vocabulary(saved: SavedBase, bench) -> None:
    """Every word of every question and answer of the stream must be in the base's vocabulary: an unknown
    word would reach the model as ``<unk>``, and an unknown answer word could never be produced."""
    tok = saved.tokenizer
    unk = tok.token_to_id(UNK)
    problems = []
    for task in bench.tasks:
        for records, path in ((task.train, task.train_file), (task.test, task.test_file)):
            texts = [f"{r.question} {r.answer}" for r in records]
            for record, text, enc in zip(records, texts, tok.encode_batch(texts, add_special_tokens=False)):
                unknown = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk]
                if unknown:
                    problems.append(f"{path}: record '{record.id}': word(s) {', '.join(map(repr, unknown[:5]))} "
                                    f"not in the vocabulary of the saved base {saved.path}")
    if problems:
        more = [f"... and {len(problems) - MAX_LISTED} more records"] if len(problems) > MAX_LISTED else []
        raise BadInputError(problems[:MAX_LISTED] + more)


def load_weights(saved: SavedBase, model: torch.nn.Module) -> None:
    path = saved.path / "base.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BadInputError(f"{path}: cannot read the weights ({exc}); the file is damaged, re-export it") from None
    expected = model.state_dict()
    problems = [f"{path}: tensor '{k}' missing" for k in expected if k not in state]
    problems += [f"{path}: tensor '{k}' has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{path}: unexpected tensor '{k}'" for k in state if k not in expected]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    problems += [f"{path}: tensor '{k}' holds NaN or infinite values" for k in bad]
    if problems:
        raise BadInputError(problems[:MAX_LISTED])
    model.load_state_dict(state, strict=True)


def save_base(backbone, out: str | Path, made_by: dict) -> Path:
    """Write ``backbone``'s base (weights, vocabulary, shape) to ``out`` (new or empty directory)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: exists and is not an empty directory; choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    # clone: tied embeddings share storage, which safetensors refuses to save twice
    state = {k: v.detach().float().cpu().clone().contiguous() for k, v in backbone.model.state_dict().items()}
    tmp = out / f"base.safetensors.tmp{os.getpid()}"
    save_file(state, str(tmp))
    os.replace(tmp, out / "base.safetensors")
    backbone.tokenizer.save(str(out / "tokenizer.json"))
    meta = {"format": FORMAT, "model": model_shape(backbone.cfg), "vision": backbone.vision.identity,
            "vocab_size": backbone.tokenizer.get_vocab_size(), "made_by": made_by}
    (out / "base.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
