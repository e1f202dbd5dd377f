"""User-facing errors.

Every problem caused by the user's input (a malformed file, a wrong config key, a checkpoint that does
not fit the corpus) is raised as :class:`EpiflowError` (or a subclass), whose message names the file,
the line or field, and what to do. The CLI prints such errors without a traceback and exits with 2.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib
from typing import Iterator


class EpiflowError(Exception):
    """An error in the user's input, with a message that says where and how to fix it."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.fix = fix
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (": ".join([", ".join(where), message]) if where else message)
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


class InputFormatError(EpiflowError):
    """A data file does not follow its format."""


class ConfigError(EpiflowError):
    """A configuration or manifest entry is wrong."""


class GenomeBuildError(EpiflowError):
    """The genome build of the data disagrees with the one declared."""


class VocabularyMismatchError(EpiflowError):
    """A corpus, a shard and a model disagree on the cCRE vocabulary."""


class CheckpointError(EpiflowError):
    """A checkpoint is truncated, foreign, or does not match the model/corpus."""


@contextlib.contextmanager
def decompression_errors(path, what: str = "file") -> Iterator[None]:
    """Turn a truncated or corrupt gzip met while reading inside the block (``EOFError``,
    ``zlib.error``, ``gzip.BadGzipFile`` from gzip or pandas) into :class:`InputFormatError` naming
    ``path``."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputFormatError(f"cannot decompress the {what} ({exc})", path=str(path),
                               fix="the file is truncated or not gzip/bgzip; re-download it") from None
