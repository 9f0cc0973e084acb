"""Tokenizers behind one spec string (``data.tokenizer``).

byte                    UTF-8 bytes, vocab 256; offline default, no dependency
path/to/tokenizer.json  a Hugging Face ``tokenizers`` JSON file
tiktoken:<encoding>     e.g. tiktoken:cl100k_base; needs the encoding cached or a network download
"""

from __future__ import annotations

import os

VALID = "byte, path/to/tokenizer.json, tiktoken:<encoding>"


class ByteTokenizer:
    vocab_size = 256

    def __init__(self):
        self.spec = "byte"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class JsonTokenizer:
    def __init__(self, path: str):
        import tokenizers  # lazy: only JSON tokenizers need it

        self.spec = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises plain Exception subclasses with multi-line text
            raise ValueError(f"cannot load tokenizers JSON {path!r}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class TiktokenTokenizer:
    def __init__(self, name: str):
        try:
            import tiktoken
        except ImportError:
            raise ValueError("tokenizer tiktoken:... needs the `tiktoken` package (pip install tiktoken)") from None
        self.spec = f"tiktoken:{name}"
        try:
            self._enc = tiktoken.get_encoding(name)
        except Exception as e:  # unknown name, or no network and nothing cached
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"tiktoken encoding {name!r} is unavailable ({msg}); it needs a network download or a cached "
                "copy in TIKTOKEN_CACHE_DIR; use --tokenizer byte offline"
            ) from None
        self.vocab_size = self._enc.n_vocab

    @property
    def encoding(self):
        """The tiktoken.Encoding (asura.io.export converts it for transformers)."""
        return self._enc

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def check_spec(spec: str, key: str = "tokenizer") -> None:
    """Raise a one-line ValueError for a spec of no valid form, or a JSON path that does not exist.

    Loads nothing (tiktoken may need the network); ``key`` names where the spec came from.
    """
    if spec == "byte" or spec.startswith("tiktoken:"):
        return
    if not spec.endswith(".json"):
        raise ValueError(f"unknown {key} {spec!r}; valid: {VALID}")
    if not os.path.isfile(spec):
        raise ValueError(f"{key} file {spec!r} does not exist")


def load_tokenizer(spec: str):
    """Tokenizer for a spec string; raises a one-line ValueError naming the valid forms."""
    check_spec(spec)
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.split(":", 1)[1])
    return JsonTokenizer(spec)
