"""Z-Image's prompt tokenizer: Qwen2's byte-level BPE (the `tokenizers` package) wrapped the way ComfyUI 0.8 does it.

ComfyUI (comfy/text_encoders/z_image.py) tokenizes a prompt as transformers' Qwen2Tokenizer loaded from its
`comfy/text_encoders/qwen25_tokenizer` folder (vocab.json, merges.txt, tokenizer_config.json):
- the prompt is put into the chat template `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`;
- no start/end token is added, nothing is padded or truncated, prompt weights are disabled;
- `\\(` and `\\)` become `(` and `)` (sd1_clip's escape/unescape), and the text is split at every ` embedding:`
  or `\\nembedding:` (the space or newline dropped), each piece tokenized on its own: sd1_clip's textual-inversion
  syntax, though Z-Image's Qwen3Tokenizer gets no embedding folder, so the `embedding:name` text itself is kept;
- the attention mask ends at the first `<|endoftext|>` (the pad token, id 151643), which is masked too.

The vocabulary is not shipped with this repository: it is found in the ComfyUI installation (see find_tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PAD_TOKEN = "<|endoftext|>"
COMFY_TOKENIZER_DIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
#: Qwen2Tokenizer's pre-tokenisation pattern (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_EMBEDDING_SPLIT = re.compile(" embedding:|\nembedding:")
_EMBEDDING_PREFIX = "embedding:"
_FOLDER_FILES = ("vocab.json", "merges.txt")
_WHERE = (
    "pass --tokenizer with ComfyUI's comfy/text_encoders/qwen25_tokenizer folder (or set COMFYUI_PATH to the "
    "ComfyUI folder), or a Qwen3 tokenizer.json (from the Qwen/Qwen3-4B release)"
)


class TokenizerNotFound(ValueError):
    """No usable Qwen tokenizer at the given or discovered places."""


def _backend():
    try:
        import tokenizers
    except ImportError as error:  # pragma: no cover - it is a declared requirement
        raise TokenizerNotFound("the 'tokenizers' package is missing: pip install tokenizers") from error
    return tokenizers


def _from_folder(folder: Path):
    """vocab.json + merges.txt (+ tokenizer_config.json's added tokens), built like transformers' Qwen2Tokenizer."""
    tokenizers = _backend()
    model = tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = tokenizers.normalizers.NFC()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    config_path = folder / "tokenizer_config.json"
    added = (
        json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        if config_path.is_file()
        else {}
    )
    for token_id, entry in sorted(added.items(), key=lambda item: int(item[0])):
        token = tokenizers.AddedToken(
            entry["content"],
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            special=bool(entry.get("special", False)),
        )
        tokenizer.add_tokens([token])
        if tokenizer.token_to_id(entry["content"]) != int(token_id):
            raise TokenizerNotFound(
                f"{config_path}: added token {entry['content']!r} got id {tokenizer.token_to_id(entry['content'])}, "
                f"the file says {token_id}; vocab.json and tokenizer_config.json do not belong together"
            )
    return tokenizer


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ZImageTokenizer:
    """Captions -> token ids exactly as ComfyUI's ZImageTokenizer + SDClipModel's attention mask produce them."""

    backend: object
    source: Path
    digest: str
    pad_id: int

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZImageTokenizer:
        """A tokenizer folder (vocab.json + merges.txt [+ tokenizer_config.json]) or a tokenizer.json file."""
        path = Path(path)
        try:
            if path.is_dir() and all((path / name).is_file() for name in _FOLDER_FILES):
                files = [path / name for name in (*_FOLDER_FILES, "tokenizer_config.json") if (path / name).is_file()]
                backend = _from_folder(path)
            elif path.is_dir() and (path / "tokenizer.json").is_file():
                files, backend = [path / "tokenizer.json"], _backend().Tokenizer.from_file(str(path / "tokenizer.json"))
            elif path.is_file() and path.name.endswith(".json"):
                files, backend = [path], _backend().Tokenizer.from_file(str(path))
            else:
                raise TokenizerNotFound(f"--tokenizer {path}: not a tokenizer.json nor a folder with {_FOLDER_FILES}")
        except TokenizerNotFound:
            raise
        except Exception as error:  # the tokenizers package raises plain Exceptions for unreadable files
            raise TokenizerNotFound(f"cannot read the Qwen tokenizer at {path} ({error}); {_WHERE}") from error
        pad_id = backend.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise TokenizerNotFound(f"{path} has no {PAD_TOKEN} token, so it is not Qwen's tokenizer; {_WHERE}")
        return cls(backend=backend, source=path, digest=_digest(files), pad_id=pad_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _ids(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def token_ids(self, caption: str) -> list[int]:
        """The ids the text encoder sees (the unmasked prefix of ComfyUI's tokens for this caption)."""
        text = CHAT_TEMPLATE.format(caption)
        text = text.replace("\\)", "\0\1").replace("\\(", "\0\2").replace("\0\1", ")").replace("\0\2", "(")
        pieces = _EMBEDDING_SPLIT.split(text)
        ids = self._ids(pieces[0]) if pieces[0] else []
        for piece in pieces[1:]:  # Z-Image's tokenizer has no embedding folder: the text stays, split apart
            ids += self._ids(_EMBEDDING_PREFIX + piece)
        # SDClipModel masks from the first pad token on (the pad included); those positions are dropped.
        return ids[: ids.index(self.pad_id)] if self.pad_id in ids else ids


def find_tokenizer(explicit: str | os.PathLike | None, text_encoder_file: str | os.PathLike) -> Path:
    """--tokenizer when given, else ComfyUI's qwen25_tokenizer folder found from (in order): COMFYUI_PATH, the text
    encoder file's location (a ComfyUI models/text_encoders folder), this repository's location (custom_nodes)."""
    if explicit is not None:
        return Path(explicit)
    candidates: list[tuple[Path, str]] = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append((Path(os.environ["COMFYUI_PATH"]), "COMFYUI_PATH"))
    for parent in Path(text_encoder_file).resolve().parents:
        candidates.append((parent, f"the ComfyUI folder above {text_encoder_file}"))
    for parent in Path(__file__).resolve().parents:
        candidates.append((parent, "the ComfyUI folder above this custom node"))
    for root, why in candidates:
        folder = root / COMFY_TOKENIZER_DIR
        if all((folder / name).is_file() for name in _FOLDER_FILES):
            logger.info("using ComfyUI's Qwen tokenizer %s (found from %s)", folder, why)
            return folder
    raise TokenizerNotFound(f"no Qwen tokenizer found for {text_encoder_file}: {_WHERE}")
